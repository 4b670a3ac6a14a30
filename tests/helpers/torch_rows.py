"""Rows built by hand per docs/FORMAT.md, for the torch runtime tests.

tests/torch/test_torch_rows.py checks that these helpers really produce what the format
describes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from onepass_prep.format import SCHEMA_V1, SCHEMA_V2

IGNORE = -100
NORMALIZATIONS = ("token", "turn", "conversation")


def token_parents(seg_lens: Sequence[int], seg_parents: Sequence[int]) -> list[int]:
    """Parent token of every token, straight from the FORMAT.md 'Tree' paragraph."""
    starts = np.cumsum([0, *seg_lens])
    parents = []
    for s, length in enumerate(seg_lens):
        for k in range(length):
            if k > 0:
                parents.append(int(starts[s]) + k - 1)
            elif seg_parents[s] == -1:
                parents.append(-1)
            else:
                parents.append(int(starts[seg_parents[s] + 1]) - 1)
    return parents


def reference_visible(seg_lens: Sequence[int], seg_parents: Sequence[int]) -> np.ndarray:
    """``[L, L]`` bool from the FORMAT.md 'Attention' rule, by walking seg_parents."""
    segment_of = np.repeat(np.arange(len(seg_lens)), seg_lens)
    length = len(segment_of)
    visible = np.zeros((length, length), bool)
    for q in range(length):
        ancestors, s = set(), int(segment_of[q])
        while s != -1:
            ancestors.add(s)
            s = seg_parents[s]
        for kv in range(q + 1):
            visible[q, kv] = segment_of[kv] in ancestors
    return visible


def depths(seg_lens: Sequence[int], seg_parents: Sequence[int]) -> list[int]:
    out: list[int] = []
    for parent in token_parents(seg_lens, seg_parents):
        out.append(0 if parent == -1 else out[parent] + 1)
    return out


def make_row(
    input_ids: Sequence[int],
    labels: Sequence[int],
    seg_lens: Sequence[int],
    seg_parents: Sequence[int],
    conversation_ids: Sequence[str] = ("c0",),
    loss_weights: Sequence[float] | None = None,
    loss_units: int | None = None,
) -> dict:
    """A v2 row; without loss columns given, the plain token mean (weight 1 per trained token,
    its trained tokens as units)."""
    trained = [label != IGNORE for label in labels]
    return {
        "input_ids": list(map(int, input_ids)),
        "position_ids": depths(seg_lens, seg_parents),
        "labels": list(map(int, labels)),
        "mask_spec": {"seg_lens": list(map(int, seg_lens)), "seg_parents": list(map(int, seg_parents))},
        "conversation_ids": list(conversation_ids),
        "num_tokens": len(input_ids),
        "num_trained_tokens": sum(trained),
        "n_pass_tokens": 0,
        "loss_weights": [float(t) for t in trained] if loss_weights is None else list(loss_weights),
        "loss_units": sum(trained) if loss_units is None else loss_units,
    }


def random_row(rng: np.random.Generator, segments: int, vocab: int = 500, weighted: bool = False) -> dict:
    """A random pre-order forest (several roots) with random labels where labels are allowed;
    ``weighted``: random float32 loss weights in (0, 2] on trained tokens and random units in
    [1, trained tokens] (else the plain token mean)."""
    seg_parents: list[int] = []
    path: list[int] = []
    for s in range(segments):
        if s == 0 or rng.random() < 0.15:
            seg_parents.append(-1)
            path = [s]
        else:
            k = int(rng.integers(0, len(path)))
            seg_parents.append(path[k])
            path = [*path[: k + 1], s]
    seg_lens = rng.integers(1, 5, size=segments).tolist()
    ids = rng.integers(0, vocab, size=sum(seg_lens)).tolist()
    parents = token_parents(seg_lens, seg_parents)
    labels = [
        ids[j] if j >= 1 and parents[j] == j - 1 and rng.random() < 0.6 else IGNORE
        for j in range(len(ids))
    ]
    if not weighted:
        return make_row(ids, labels, seg_lens, seg_parents)
    trained = [label != IGNORE for label in labels]
    weights = [float(np.float32(2 - 2 * rng.random())) if t else 0.0 for t in trained]
    units = int(rng.integers(1, sum(trained) + 1)) if any(trained) else 0
    return make_row(ids, labels, seg_lens, seg_parents, loss_weights=weights, loss_units=units)


@dataclass
class _Trie:
    children: dict[int, _Trie] = field(default_factory=dict)
    branches: list[int] = field(default_factory=list)


def layout(
    samples: Sequence[tuple[Sequence[int], int]], token_weights: Sequence[float] | None = None
) -> tuple[list, list, list, list, list]:
    """Lay N-pass samples ``(S_i, t_i)`` out as one tree (input_ids, labels, seg_lens, parents,
    loss weights).

    Untrained prefixes share a trie; each sample's trained tokens form a segment of their own
    that starts with an unlabelled copy of the branch-point token ``S_i[t_i - 1]``, hung under
    the trie node of ``S_i[:t_i - 1]`` (a root when that is empty). ``token_weights[i]`` is the
    loss weight of each of sample ``i``'s tokens (default 1); a sample of weight 0 keeps its
    segment, untrained (labels -100).
    """
    if token_weights is None:
        token_weights = [1.0] * len(samples)
    root = _Trie()
    for i, (tokens, start) in enumerate(samples):
        node = root
        for token in tokens[: start - 1]:
            node = node.children.setdefault(token, _Trie())
        node.branches.append(i)
    segments: list[tuple[list[int], list[int], int, list[float]]] = []

    def visit(node: _Trie, parent: int) -> None:
        for i in node.branches:
            tokens, start = samples[i]
            trained = list(tokens[start:])
            weight = float(token_weights[i])
            labels = trained if weight else [IGNORE] * len(trained)
            segments.append(
                ([tokens[start - 1], *trained], [IGNORE, *labels], parent, [0.0] + [weight] * len(trained))
            )
        for token, child in node.children.items():
            chain = [token]
            while not child.branches and len(child.children) == 1:
                ((token, child),) = child.children.items()
                chain.append(token)
            segments.append((chain, [IGNORE] * len(chain), parent, [0.0] * len(chain)))
            visit(child, len(segments) - 1)

    visit(root, -1)
    ids = [t for tokens, _, _, _ in segments for t in tokens]
    labels = [t for _, lab, _, _ in segments for t in lab]
    weights = [w for *_, ws in segments for w in ws]
    return ids, labels, [len(s[0]) for s in segments], [s[2] for s in segments], weights


def token_weights(
    conversations: Sequence[Sequence[tuple[Sequence[int], int]]],
    message_weights: Sequence[Sequence[float]],
    normalization: str,
) -> tuple[list[list[float]], int]:
    """Per-sample token weights and the units of a row holding these conversations, straight
    from the rule: the step's loss is sum(weight x token loss) / sum(units), where

    - token: weight w, units = trained tokens;
    - turn: weight w / n (n = the sample's trained tokens), units = trained samples;
    - conversation: weight w / N (N = the conversation's trained tokens), units = conversations
      with any trained token.

    A sample of message weight 0 is not trained at all (no tokens, no units).
    """
    weights, units = [], 0
    for samples, message in zip(conversations, message_weights, strict=True):
        sizes = [len(tokens) - start for tokens, start in samples]
        trained = [n for n, w in zip(sizes, message, strict=True) if w > 0]
        if normalization == "token":
            weights.append([float(w) for w in message])
            units += sum(trained)
        elif normalization == "turn":
            weights.append([w / n for w, n in zip(message, sizes, strict=True)])
            units += len(trained)
        elif normalization == "conversation":
            weights.append([w / sum(trained) if w > 0 else 0.0 for w in message])
            units += bool(trained)
        else:
            raise ValueError(normalization)
    return weights, units


def pack(
    conversations: Sequence[Sequence[tuple[Sequence[int], int]]],
    names: Sequence[str],
    message_weights: Sequence[Sequence[float]] | None = None,
    normalization: str = "token",
) -> dict:
    """Several conversations' trees in one row, each starting at a new root, with the loss
    weights and units of ``normalization`` (message weights default to 1)."""
    if message_weights is None:
        message_weights = [[1.0] * len(samples) for samples in conversations]
    per_sample, units = token_weights(conversations, message_weights, normalization)
    ids: list[int] = []
    labels: list[int] = []
    seg_lens: list[int] = []
    seg_parents: list[int] = []
    weights: list[float] = []
    for samples, sample_weights in zip(conversations, per_sample, strict=True):
        i, lab, lens, parents, w = layout(samples, sample_weights)
        offset = len(seg_lens)
        seg_parents += [p if p == -1 else p + offset for p in parents]
        ids, labels, seg_lens, weights = ids + i, labels + lab, seg_lens + lens, weights + w
    return make_row(ids, labels, seg_lens, seg_parents, names, weights, units)


def chat_samples(rng: np.random.Generator, turns: int, vocab: int = 500) -> list[tuple[list, int]]:
    """N-pass samples of a synthetic reasoning chat: history keeps answers, drops reasoning."""
    def span(lo: int, hi: int) -> list[int]:
        return rng.integers(3, vocab, size=int(rng.integers(lo, hi))).tolist()

    header = [1, 2]  # the assistant header every prompt ends with
    history: list[int] = []
    samples = []
    for _ in range(turns):
        prompt = history + span(2, 6) + header
        reasoning, answer = span(1, 5), span(1, 5)
        samples.append((prompt + reasoning + answer, len(prompt)))
        history = prompt + answer
    return samples


def write_run(folder: Path, rows: Sequence[dict], rows_per_shard: int, rows_per_group: int,
              version: int = 2, loss: dict | None = None) -> Path:
    """Shards and a manifest as `onepass-prep convert` writes them (format v1: without the loss
    columns and the manifest's "loss")."""
    folder.mkdir(parents=True, exist_ok=True)
    schema = SCHEMA_V1 if version == 1 else SCHEMA_V2
    if version == 1:
        rows = [{k: v for k, v in row.items() if k not in ("loss_weights", "loss_units")} for row in rows]
    shards = []
    for n, first in enumerate(range(0, len(rows), rows_per_shard)):
        chunk = rows[first : first + rows_per_shard]
        name = f"part-{n:05d}.parquet"
        table = pa.Table.from_pylist(list(chunk), schema=schema)
        pq.write_table(table, folder / name, row_group_size=rows_per_group, compression="zstd")
        shards.append({"file": name, "rows": len(chunk), "tokens": sum(r["num_tokens"] for r in chunk)})
    manifest = {"format": "onepass-prep", "format_version": version, "tool_version": "test",
                "shards": shards}
    if version != 1:
        manifest["loss"] = loss or {"normalization": "token", "train_on": "all"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def table_of(rows: Sequence[dict]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=SCHEMA_V2)
