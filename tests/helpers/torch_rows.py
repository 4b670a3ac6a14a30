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

from onepass_prep.format import SCHEMA

IGNORE = -100


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
) -> dict:
    return {
        "input_ids": list(map(int, input_ids)),
        "position_ids": depths(seg_lens, seg_parents),
        "labels": list(map(int, labels)),
        "mask_spec": {"seg_lens": list(map(int, seg_lens)), "seg_parents": list(map(int, seg_parents))},
        "conversation_ids": list(conversation_ids),
        "num_tokens": len(input_ids),
        "num_trained_tokens": sum(label != IGNORE for label in labels),
        "n_pass_tokens": 0,
    }


def random_row(rng: np.random.Generator, segments: int, vocab: int = 500) -> dict:
    """A random pre-order forest (several roots) with random labels where labels are allowed."""
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
    return make_row(ids, labels, seg_lens, seg_parents)


@dataclass
class _Trie:
    children: dict[int, _Trie] = field(default_factory=dict)
    branches: list[int] = field(default_factory=list)


def layout(samples: Sequence[tuple[Sequence[int], int]]) -> tuple[list, list, list, list]:
    """Lay N-pass samples ``(S_i, t_i)`` out as one tree (input_ids, labels, seg_lens, parents).

    Untrained prefixes share a trie; each sample's trained tokens form a segment of their own
    that starts with an unlabelled copy of the branch-point token ``S_i[t_i - 1]``, hung under
    the trie node of ``S_i[:t_i - 1]`` (a root when that is empty).
    """
    root = _Trie()
    for i, (tokens, start) in enumerate(samples):
        node = root
        for token in tokens[: start - 1]:
            node = node.children.setdefault(token, _Trie())
        node.branches.append(i)
    segments: list[tuple[list[int], list[int], int]] = []

    def visit(node: _Trie, parent: int) -> None:
        for i in node.branches:
            tokens, start = samples[i]
            trained = list(tokens[start:])
            segments.append(([tokens[start - 1], *trained], [IGNORE, *trained], parent))
        for token, child in node.children.items():
            chain = [token]
            while not child.branches and len(child.children) == 1:
                ((token, child),) = child.children.items()
                chain.append(token)
            segments.append((chain, [IGNORE] * len(chain), parent))
            visit(child, len(segments) - 1)

    visit(root, -1)
    ids = [t for tokens, _, _ in segments for t in tokens]
    labels = [t for _, lab, _ in segments for t in lab]
    return ids, labels, [len(s[0]) for s in segments], [s[2] for s in segments]


def pack(conversations: Sequence[Sequence[tuple[Sequence[int], int]]], names: Sequence[str]) -> dict:
    """Several conversations' trees in one row, each starting at a new root."""
    ids: list[int] = []
    labels: list[int] = []
    seg_lens: list[int] = []
    seg_parents: list[int] = []
    for samples in conversations:
        i, lab, lens, parents = layout(samples)
        offset = len(seg_lens)
        seg_parents += [p if p == -1 else p + offset for p in parents]
        ids, labels, seg_lens = ids + i, labels + lab, seg_lens + lens
    return make_row(ids, labels, seg_lens, seg_parents, names)


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
              version: int = 1) -> Path:
    """Shards and a manifest as `onepass-prep convert` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    schema = SCHEMA
    shards = []
    for n, first in enumerate(range(0, len(rows), rows_per_shard)):
        chunk = rows[first : first + rows_per_shard]
        name = f"part-{n:05d}.parquet"
        table = pa.Table.from_pylist(list(chunk), schema=schema)
        pq.write_table(table, folder / name, row_group_size=rows_per_group, compression="zstd")
        shards.append({"file": name, "rows": len(chunk), "tokens": sum(r["num_tokens"] for r in chunk)})
    manifest = {"format": "onepass-prep", "format_version": version, "tool_version": "test",
                "shards": shards}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def table_of(rows: Sequence[dict]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)
