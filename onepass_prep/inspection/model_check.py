"""Model checks: is one pass over tree rows exact for this architecture? Imports torch and
transformers only when called.

``check_model`` (``onepass-prep check-model``): a tiny random-weight model of a config (few
layers holding every layer type of the original, small widths, windows and chunks shrunk
below the rows) runs synthetic tree rows (several conversations per row, two rows, padding)
through ``install_mask_hook`` with each attention implementation, against N separate passes
of the unmodified model, token by token.

``check_losses`` (``verify --model-check``): a tiny model of the run's architecture (the
tokenizer folder's ``config.json`` when it has one, else Qwen3) gives every trained token of
the run the same loss in the rows, through the runtime's masks, as in its own N-pass sample.
Each sample runs alone with a plain causal mask. Each tree of a row runs alone (trees never
see each other), up to TREE_LIMIT tokens; longer trees are counted as not checked. The loss
of a (context, target) pair depends on nothing else, so a row token is compared with any
sample token of the same key. Token ids are renumbered densely over the samples' vocabulary
(the weights are random, so only which tokens are equal matters): the output layer then has
thousands of rows instead of 150k, which is most of the work.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onepass_prep.inspection.pairs import row_keys
from onepass_prep.inspection.runs import Run, iter_rows

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

TREE_LIMIT = 4096
TOLERANCE = 1e-4
HEAD_CHUNK = 256  # positions per output-layer call, so logits stay small for any vocabulary
IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "onepass_tree")
WINDOW, CHUNK = 5, 6  # shrunk windows and chunks, far below the rows' depth
VOCAB = 512
IGNORE = -100

# Widths of a tiny model, set where the config has the field (MoE, MLA, linear attention and
# state-space fields included, so hybrids build and are refused for their layers, not their size).
_TINY: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, head_dim=8,
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, intermediate_size_mlp=64, n_group=1, topk_group=1,
    kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
    mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_expand=1, mamba_d_ssm=32,
    mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=1, linear_num_heads=2, linear_head_dim=8,
    initializer_range=0.3,
)


@dataclass(frozen=True)
class Verdict:
    implementation: str
    result: str  # "exact", "refused", "not available" or "differs"
    detail: str


def load_config(source: str) -> PreTrainedConfig:
    """A local folder's (or file's) config.json, or a hub id's where the hub is reachable."""
    from transformers import AutoConfig

    path = Path(source)
    if path.is_file():
        path = path.parent
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else source)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{source}: cannot read a model config ({str(error).splitlines()[0]})") from None


def tiny_config(config: PreTrainedConfig, vocab: int = VOCAB, longest: int = 0) -> PreTrainedConfig:
    """The text model of ``config`` shrunk: the shortest prefix of its layers that holds every
    layer type (at least two layers), small widths, windows of WINDOW and chunks of CHUNK."""
    text = config.get_text_config()
    values = copy.deepcopy(text.to_dict())
    count = int(text.num_hidden_layers)  # Nemotron-H derives it from its layer types
    types = getattr(text, "layer_types", None)
    keep = min(count, 2)
    if types:
        keep = max(keep, max(list(types).index(t) for t in set(types)) + 1)
    for field, value in list(values.items()):  # per-layer lists: the kept prefix
        if isinstance(value, list) and len(value) == count and field != "layer_types":
            values[field] = value[:keep]
    if types and "layer_types" in values:
        values["layer_types"] = list(types)[:keep]
    heads = int(values.get("num_attention_heads") or 4)
    kv_heads = int(values.get("num_key_value_heads") or heads)
    values.update({field: v for field, v in _TINY.items() if values.get(field) is not None})
    values.update(num_hidden_layers=keep, vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if "num_key_value_heads" in values:
        values["num_key_value_heads"] = 4 if kv_heads == heads else 2
    if values.get("num_experts_per_tok"):
        values["num_experts_per_tok"] = min(int(values["num_experts_per_tok"]), 2)
    if values.get("first_k_dense_replace"):
        values["first_k_dense_replace"] = 1
    if values.get("sliding_window") is not None:
        values["sliding_window"] = WINDOW
    if values.get("attention_chunk_size") is not None:
        values["attention_chunk_size"] = CHUNK
    values["max_position_embeddings"] = max(int(values.get("max_position_embeddings") or 0), longest, 4096)
    return type(text).from_dict(values)


def check_model(config: PreTrainedConfig) -> tuple[str, list[Verdict]]:
    """One-pass per-token losses against N separate passes, per attention implementation, on a
    tiny model of ``config``. Returns the layers as read and one verdict per implementation."""
    import torch

    from onepass_prep.torch.layers import layer_kinds

    tiny = tiny_config(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model is tiny: more threads only add overhead
    try:
        torch.manual_seed(0)
        reference = _build(tiny, "eager")
        layers = _runs([k.describe() for k in layer_kinds(reference)])
        rows, samples = synthetic_rows(np.random.default_rng(0))
        expected = _n_pass_losses(reference, samples)
        verdicts = [_one(tiny, reference, implementation, rows, expected) for implementation in IMPLEMENTATIONS]
    finally:
        torch.set_num_threads(threads)
    return layers, verdicts


def _runs(names: list[str]) -> str:
    """``a, a, b`` -> ``2 x a, b``."""
    out: list[tuple[str, int]] = []
    for name in names:
        if out and out[-1][0] == name:
            out[-1] = (name, out[-1][1] + 1)
        else:
            out.append((name, 1))
    return ", ".join(f"{n} x {name}" if n > 1 else name for name, n in out)


def _build(config: PreTrainedConfig, implementation: str) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=implementation).eval()


def _one(config, reference, implementation: str, rows: list[dict], expected: dict[tuple, float]) -> Verdict:
    import torch

    from onepass_prep.torch import OnePassCollator, install_mask_hook

    tree = implementation == "onepass_tree"
    try:
        model = _build(config, "eager" if tree else implementation)
    except (ValueError, ImportError) as error:
        return Verdict(implementation, "not available", _line(error))
    model.load_state_dict(reference.state_dict())
    try:
        install_mask_hook(model, kind="tree" if tree else None)
    except ValueError as error:
        return Verdict(implementation, "refused", _line(error))
    batch = OnePassCollator(pad_to_multiple_of=16)(rows)
    try:
        with torch.no_grad():
            logits = model(**batch).logits
    except (ValueError, NotImplementedError, RuntimeError) as error:
        return Verdict(implementation, "not available", f"on this machine: {_line(error)}")
    worst, compared = 0.0, 0
    for b, row in enumerate(rows):
        keys = _row_keys(row)
        for j, key in keys.items():
            loss = torch.nn.functional.cross_entropy(logits[b, j - 1], batch["labels"][b, j]).item()
            worst, compared = max(worst, abs(loss - expected[key])), compared + 1
    detail = f"{compared} token losses, largest difference {worst:.1e}"
    return Verdict(implementation, "exact" if worst <= TOLERANCE else "differs", detail)


def _line(error: BaseException) -> str:
    """The error's first sentence (transformers adds paragraphs of advice)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(". ")[0].rstrip(".")


def synthetic_rows(rng: np.random.Generator, vocab: int = VOCAB) -> tuple[list[dict], list[tuple[list[int], int]]]:
    """Two rows of tree-shaped conversations (three and two per row), and their N-pass samples.

    A conversation is a prompt (a root, untrained), two answers to it (siblings) and a
    follow-up under the first answer, each a segment that starts with an unlabelled token and
    trains the rest (FORMAT.md: a labelled token follows its parent). A sample is a trained
    segment with its ancestors, trained from the segment's second token.
    """
    rows, samples = [], []
    for conversations in (3, 2):
        ids: list[int] = []
        seg_lens: list[int] = []
        seg_parents: list[int] = []
        labels: list[int] = []
        for _ in range(conversations):
            prompt = rng.integers(3, vocab, int(rng.integers(6, 12))).tolist()
            answers = [rng.integers(3, vocab, int(rng.integers(8, 16))).tolist() for _ in range(3)]
            root = len(seg_lens)
            parts = [(prompt, -1), (answers[0], root), (answers[1], root + 1), (answers[2], root)]
            paths: dict[int, list[int]] = {}
            for tokens, parent in parts:
                index = len(seg_lens)
                paths[index] = (paths[parent] if parent != -1 else []) + tokens
                ids += tokens
                seg_lens.append(len(tokens))
                seg_parents.append(parent)
                trained = parent != -1
                labels += [IGNORE] + (tokens[1:] if trained else [IGNORE] * (len(tokens) - 1))
                if trained:
                    samples.append((paths[index], len(paths[index]) - len(tokens) + 1))
        depth: list[int] = []
        for s, length in enumerate(seg_lens):
            parent = seg_parents[s]
            start = 0 if parent == -1 else _segment_depth_end(seg_lens, seg_parents, parent) + 1
            depth += list(range(start, start + length))
        rows.append({
            "input_ids": ids, "labels": labels, "position_ids": depth,
            "mask_spec": {"seg_lens": seg_lens, "seg_parents": seg_parents},
        })
    return rows, samples


def _segment_depth_end(seg_lens: list[int], seg_parents: list[int], segment: int) -> int:
    """Position of a segment's last token: its length plus its ancestors' lengths, minus one."""
    total = 0
    while segment != -1:
        total += seg_lens[segment]
        segment = seg_parents[segment]
    return total - 1


def _row_keys(row: dict) -> dict[int, tuple]:
    """Labelled token index -> (context, target), the context read along the tree."""
    ids, lens, parents = row["input_ids"], row["mask_spec"]["seg_lens"], row["mask_spec"]["seg_parents"]
    starts = np.cumsum([0, *lens])
    keys = {}
    for s, length in enumerate(lens):
        path, a = [], s
        while a != -1:
            path.append(a)
            a = parents[a]
        context_before = [t for a in reversed(path[1:]) for t in ids[starts[a] : starts[a + 1]]]
        for k in range(1, length):
            j = int(starts[s]) + k
            if row["labels"][j] != IGNORE:
                keys[j] = (tuple(context_before + ids[starts[s] : j]), ids[j])
    return keys


def _n_pass_losses(model, samples: list[tuple[list[int], int]]) -> dict[tuple, float]:
    import torch

    losses = {}
    with torch.no_grad():
        for tokens, start in samples:
            logits = model(input_ids=torch.tensor([tokens])).logits[0]
            for t in range(start, len(tokens)):
                target = torch.tensor(tokens[t])
                losses[(tuple(tokens[:t]), tokens[t])] = torch.nn.functional.cross_entropy(logits[t - 1], target).item()
    return losses


def run_config(run: Run, model: str | None) -> PreTrainedConfig | None:
    """The architecture of the run's tokenizer folder (its config.json), if it has one."""
    name = model or (run.manifest.get("tokenizer") or {}).get("name")
    folder = Path(str(name)) if name else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    return load_config(str(folder))


def check_losses(run: Run, expected, expected_keys, powers, report, config=None) -> str:
    """Compare losses; add problems to `report`; return a one-line summary."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model is tiny: more threads only add overhead
    try:
        return _check(run, expected, expected_keys, powers, report, config)
    finally:
        torch.set_num_threads(threads)


def _check(run: Run, expected, expected_keys, powers, report, config) -> str:
    import torch

    from onepass_prep.torch import install_mask_hook

    torch.manual_seed(0)
    vocabulary = np.unique(np.concatenate([np.zeros(1, np.int64)] + [e.ids for e in expected]))
    longest = max((len(e.ids) for e in expected), default=1)
    model, name = _verify_model(config, len(vocabulary) + 1, longest)

    def dense(ids: np.ndarray) -> np.ndarray:
        """Index in the vocabulary; ids outside it (seen by no trained token) share one."""
        index = np.minimum(np.searchsorted(vocabulary, ids), len(vocabulary) - 1)
        return np.where(vocabulary[index] == ids, index, len(vocabulary))

    reference: dict[tuple, float] = {}
    with torch.no_grad():
        for sample, sample_keys in zip(expected, expected_keys, strict=True):
            targets = np.arange(sample.start, len(sample.ids))
            losses = _losses(model, dense(sample.ids), np.arange(len(sample.ids)), None, targets)
            for key, loss in zip(map(tuple, sample_keys.tolist()), losses, strict=True):
                reference.setdefault(key, loss)
        install_mask_hook(model)
        compared = skipped = 0
        worst = 0.0
        for row in iter_rows(run):
            found, labelled = row_keys(row, powers)
            for start, end in row.trees:
                inside = (labelled >= start) & (labelled < end)
                if not inside.any():
                    continue
                if end - start > TREE_LIMIT:
                    skipped += 1
                    continue
                losses = _losses(
                    model, dense(row.input_ids[start:end]), row.position_ids[start:end],
                    row.subtree_end[start:end] - start, labelled[inside] - start,
                )
                for key, j, loss in zip(found[inside].tolist(), labelled[inside], losses, strict=True):
                    difference = abs(loss - reference[tuple(key)])
                    worst = max(worst, difference)
                    compared += 1
                    if difference > TOLERANCE:
                        report.problem(
                            f"row {row.number}, token {j}: loss {loss:.6f} in one pass, "
                            f"{reference[tuple(key)]:.6f} in its N-pass sample"
                        )
    note = f"; {skipped} trees longer than {TREE_LIMIT} tokens not checked" if skipped else ""
    return f"{compared:,} token losses compared, largest difference {worst:.2e} ({name}){note}"


def _verify_model(config, vocab: int, longest: int) -> tuple[PreTrainedModel, str]:
    """A tiny model of the run's architecture (sdpa, else eager), or Qwen3's."""
    from transformers import Qwen3Config

    if config is None:
        config = Qwen3Config(max_position_embeddings=max(8192, longest), tie_word_embeddings=False)
    tiny = tiny_config(config, vocab, longest)
    name = f"tiny random {tiny.model_type}"
    for implementation in ("sdpa", "eager"):
        try:
            return _build(tiny, implementation), name
        except ValueError:
            continue
    raise ValueError(f"transformers offers neither sdpa nor eager attention for {tiny.model_type}")


def _losses(model, ids, positions, subtree_end, targets: np.ndarray) -> list[float]:
    """Cross-entropy of predicting ids[t] from position t - 1, for each t in `targets`; with
    ``subtree_end`` through the mask hook (the runtime's masks), else plainly causal."""
    import torch

    ids_t = torch.as_tensor(np.asarray(ids, np.int64))[None]
    kwargs: dict[str, Any] = {"position_ids": torch.as_tensor(np.asarray(positions, np.int64))[None]}
    if subtree_end is not None:
        kwargs["subtree_end"] = torch.as_tensor(np.asarray(subtree_end, np.int64))[None]
    logits = model(input_ids=ids_t, **kwargs).logits[0]
    targets_t = torch.as_tensor(targets, dtype=torch.long)
    losses = []
    for chunk in targets_t.split(HEAD_CHUNK):
        losses += torch.nn.functional.cross_entropy(logits[chunk - 1], ids_t[0, chunk], reduction="none").tolist()
    return losses

