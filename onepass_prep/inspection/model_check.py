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
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest.mock import patch

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


@dataclass(frozen=True)
class ModelReport:
    """What ``check_model`` found: the tiny model's layers, what was shrunk for the test (a
    window or chunk of the original would be longer than the test rows, so it would never
    bind), and one verdict per implementation."""

    layers: str
    shrunk: list[str]
    verdicts: list[Verdict]


def load_config(source: str) -> PreTrainedConfig:
    """A local folder's (or file's) config.json, or a hub id's: from the local cache, else from
    the hub when it answers within seconds (no retries)."""
    from transformers import AutoConfig

    path = Path(source).expanduser()
    if path.is_file():
        path = path.parent
    if path.is_dir():
        return _read_config(source, lambda: AutoConfig.from_pretrained(str(path)))
    if not _looks_like_hub_id(source):
        raise ValueError(f"{source}: no such file or folder")
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError):
        pass  # not in the cache: ask the hub, if it answers
    reason = _hub_unreachable()
    if reason:
        raise ValueError(f"{source}: no such folder here, and the model hub cannot be reached ({reason})")
    return _read_config(source, lambda: AutoConfig.from_pretrained(source))


def _read_config(source: str, read) -> PreTrainedConfig:
    try:
        return read()
    except Exception as error:  # transformers' own validators raise their own classes too
        raise ValueError(f"{source}: cannot read a model config ({_line(error, 300)})") from None


def _looks_like_hub_id(source: str) -> bool:
    """``name`` or ``owner/name``: anything with more parts, a leading ``.``, ``/`` or ``~`` or
    a file suffix is a path that does not exist."""
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) is not None and not source.startswith(".") and not (
        source.endswith((".json", "/"))
    )


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (offline mode, no connection within ``timeout`` seconds),
    or None: huggingface_hub itself would retry for half a minute."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as error:
        return f"{url.hostname}: {error.strerror or error}"
    return None


def tiny_config(config: PreTrainedConfig, vocab: int = VOCAB, longest: int = 0) -> PreTrainedConfig:
    """The text model of ``config`` shrunk: the shortest prefix of its layers that holds every
    layer type (at least two layers), small widths, windows of WINDOW and chunks of CHUNK.
    Fields are looked up through the config's ``attribute_map`` (GPT-2's ``n_layer`` is its
    ``num_hidden_layers``; Nemotron-H counts its layers from ``layers_block_type``)."""
    text = config.get_text_config()
    values = copy.deepcopy(text.to_dict())
    aliases = getattr(text, "attribute_map", {}) or {}
    count = int(text.num_hidden_layers)
    types = getattr(text, "layer_types", None)
    keep = min(count, 2)
    if types:
        keep = max(keep, max(list(types).index(t) for t in set(types)) + 1)
    shared = int(values.get("num_kv_shared_layers") or 0)
    if shared:  # the last layers reuse the caches of earlier ones of their type: keep both halves
        keep = min(count, 2 * keep)
        values["num_kv_shared_layers"] = keep // 2
    for field, value in list(values.items()):  # per-layer lists: the kept prefix
        if isinstance(value, list) and len(value) == count:
            values[field] = value[:keep]
        elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            values[field] = {k: v for k, v in value.items() if int(k) < keep}  # per-layer overrides
    types_field = aliases.get("layer_types", "layer_types")
    if types and types_field in values:
        values[types_field] = list(types)[:keep]
    heads = int(getattr(text, "num_attention_heads", 0) or 4)
    kv_heads = int(getattr(text, "num_key_value_heads", 0) or heads)
    for field, value in _TINY.items():
        name = aliases.get(field, field)
        if values.get(name) is not None:
            values[name] = value
    for field in values:  # an encoder-decoder's decoder (BART, Whisper), as its causal LM builds it
        if re.fullmatch(r"(encoder|decoder)_(attention_heads|ffn_dim|layers)", field) and values[field]:
            values[field] = {"attention_heads": 4, "ffn_dim": 64, "layers": keep}[field.split("_", 1)[1]]
    layers_field = aliases.get("num_hidden_layers", "num_hidden_layers")
    if layers_field in values:
        values[layers_field] = keep
    for field in values:  # vocab_size and its kin (Gemma 3n's per-layer inputs)
        if field.startswith("vocab_size") and isinstance(values[field], int):
            values[field] = vocab
    values.update(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kv_field, top_k_field, dense_field = (
        aliases.get(f, f) for f in ("num_key_value_heads", "num_experts_per_tok", "first_k_dense_replace")
    )
    if kv_field in values:
        values[kv_field] = 4 if kv_heads == heads else 2
    if values.get(top_k_field):
        values[top_k_field] = min(int(values[top_k_field]), 2)
    if values.get(dense_field):
        values[dense_field] = 1
    if values.get("sliding_window") is not None:
        values["sliding_window"] = WINDOW
    if values.get("attention_chunk_size") is not None:
        values["attention_chunk_size"] = CHUNK
    for field, value in values.items():  # towers a text config holds (Phi-4's vision and audio): one layer
        if field.endswith("_config") and isinstance(value, dict):
            value.update({f: 1 for f in ("num_hidden_layers", "num_blocks") if isinstance(value.get(f), int)})
    positions = aliases.get("max_position_embeddings", "max_position_embeddings")
    values[positions] = max(int(values.get(positions) or 0), longest, 4096)
    return type(text).from_dict(values)


def _shrunk(config: PreTrainedConfig, tiny: PreTrainedConfig) -> list[str]:
    """The windows and chunks the test shrank, in words."""
    text = config.get_text_config()
    notes = []
    for field, words in (("sliding_window", "sliding window"), ("attention_chunk_size", "attention chunk")):
        before, after = getattr(text, field, None), getattr(tiny, field, None)
        if before is not None and after is not None and before != after:
            notes.append(f"{words} shrunk from {before} to {after} tokens for the test")
    return notes


def check_model(config: PreTrainedConfig) -> ModelReport:
    """One-pass per-token losses against N separate passes of the unmodified model, per
    attention implementation, on a tiny model of ``config``. Whatever fails in one
    implementation (building it, the hook, either run) is that implementation's verdict;
    ``ValueError`` with one line where no tiny model of the config can be built at all."""
    import torch

    model_class = _model_class(config)
    try:
        tiny = tiny_config(config)
    except Exception as error:
        raise ValueError(f"cannot shrink {type(config).__name__} to a tiny model: {_described(error)}") from None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model is tiny: more threads only add overhead
    try:
        with _flex_uncompiled():
            layers, verdicts = _verdicts(model_class, tiny)
    finally:
        torch.set_num_threads(threads)
    return ModelReport(layers, _shrunk(config, tiny), verdicts)


@contextmanager
def _flex_uncompiled() -> Iterator[None]:
    """transformers' flex attention and its BlockMasks without inductor: torch's own
    implementation of the same mask functions. Compiling them takes a minute per model on a
    CPU; the masks are what is checked."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from transformers import masking_utils
    from transformers.integrations import flex_attention as integration

    def attention(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    def block_mask(*args, _compile=False, **kwargs):
        return create_block_mask(*args, **kwargs)

    with (
        patch.object(integration, "compile_friendly_flex_attention", attention),
        patch.object(masking_utils, "create_block_mask", block_mask),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
        yield


def _verdicts(model_class, tiny: PreTrainedConfig) -> tuple[str, list[Verdict]]:
    import torch

    from onepass_prep.torch.layers import layer_kinds

    torch.manual_seed(0)
    try:
        first = model_class._from_config(copy.deepcopy(tiny)).eval()
    except Exception as error:
        raise ValueError(f"cannot build a tiny {model_class.__name__}: {_described(error)}") from None
    layers = _runs([k.describe() for k in layer_kinds(first)])
    rows, samples = synthetic_rows(np.random.default_rng(0))
    references: dict[str, dict[tuple, float]] = {}  # tree attention's N passes are eager's
    return layers, [
        _one(model_class, tiny, first.state_dict(), name, rows, samples, references) for name in IMPLEMENTATIONS
    ]


def _model_class(config: PreTrainedConfig) -> type[PreTrainedModel]:
    """The causal-LM class transformers registers for the text config's type, or for the
    config's own (Emu3's and Mllama's text configs are not registered themselves)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for model_type in (config.get_text_config().model_type, config.model_type):
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if name and hasattr(transformers, name):
            return getattr(transformers, name)
    raise ValueError(f"transformers has no causal language model for {config.model_type!r} ({type(config).__name__})")


def _runs(names: list[str]) -> str:
    """``a, a, b`` -> ``2 x a, b``."""
    out: list[tuple[str, int]] = []
    for name in names:
        if out and out[-1][0] == name:
            out[-1] = (name, out[-1][1] + 1)
        else:
            out.append((name, 1))
    return ", ".join(f"{n} x {name}" if n > 1 else name for name, n in out)


def _build(model_class, config: PreTrainedConfig, implementation: str) -> PreTrainedModel:
    return model_class._from_config(copy.deepcopy(config), attn_implementation=implementation).eval()


def _one(model_class, config, weights, implementation: str, rows: list[dict], samples, references) -> Verdict:
    """One implementation's verdict: its unmodified model's N separate passes against one
    pass through the hook, with the same weights."""
    import torch

    from onepass_prep.torch import OnePassCollator, install_mask_hook

    tree = implementation == "onepass_tree"
    base = "eager" if tree else implementation
    try:
        torch.manual_seed(0)
        model = _build(model_class, config, base)
    except (ValueError, ImportError) as error:  # transformers does not offer it for this model
        return Verdict(implementation, "not available", _line(error))
    except Exception as error:
        return Verdict(implementation, "not available", f"building the model fails: {_described(error)}")
    try:
        model.load_state_dict(weights)
        install_mask_hook(model, kind="tree" if tree else None).remove()
    except Exception as error:
        return _failed(implementation, error, "installing the hook fails")
    if tree:
        model.set_attn_implementation(base)
    try:
        expected = references.get(base) or _n_pass_losses(model, samples)
        references[base] = expected
    except NotCausal as error:
        return Verdict(implementation, "refused", str(error))
    except Exception as error:
        return Verdict(implementation, "not available", f"the unmodified model's N passes fail: {_described(error)}")
    batch = OnePassCollator(pad_to_multiple_of=16)(rows)
    try:
        install_mask_hook(model, kind="tree" if tree else None)
        with torch.no_grad():
            logits = model(**batch).logits
    except Exception as error:
        return _failed(implementation, error, "the one-pass run fails")
    worst, compared = 0.0, 0
    for b, row in enumerate(rows):
        keys = _row_keys(row)
        for j, key in keys.items():
            loss = torch.nn.functional.cross_entropy(logits[b, j - 1], batch["labels"][b, j]).item()
            worst, compared = max(worst, abs(loss - expected[key])), compared + 1
    detail = f"{compared} token losses, largest difference {worst:.1e}"
    return Verdict(implementation, "exact" if worst <= TOLERANCE else "differs", detail)


def _failed(implementation: str, error: Exception, what: str) -> Verdict:
    """onepass-prep's own ``ValueError`` or ``NotImplementedError`` is a refusal (the runtime
    says what it cannot do and what to use); anything else failed inside transformers or torch."""
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    ours = traceback is not None and "onepass_prep" in traceback.tb_frame.f_code.co_filename
    if ours and isinstance(error, (ValueError, NotImplementedError)):
        return Verdict(implementation, "refused", _line(error))
    return Verdict(implementation, "not available", f"{what}: {_described(error)}")


def _described(error: BaseException) -> str:
    """``Type: first sentence (file.py:line)``, where it was raised."""
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    where = ""
    if traceback is not None:
        where = f" ({Path(traceback.tb_frame.f_code.co_filename).name}:{traceback.tb_lineno})"
    return f"{type(error).__name__}: {_line(error, 300)}{where}"


def _line(error: BaseException, limit: int | None = None) -> str:
    """The error's first sentence (transformers adds paragraphs of advice), cut at ``limit``."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = text.split(". ")[0].rstrip(".")
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


class NotCausal(Exception):
    """The unmodified model lets a token see later ones (BERT-style models with ``is_decoder``
    false build as causal LMs): no N-pass sample is defined."""


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
        tokens = samples[0][0]
        changed = tokens[:-1] + [3 + (tokens[-1] - 2) % (VOCAB - 3)]
        first, second = (model(input_ids=torch.tensor([t])).logits[0, :-1] for t in (tokens, changed))
        if not torch.allclose(first, second, atol=TOLERANCE):
            raise NotCausal(
                f"{type(model).__name__} as configured is not causal (a token's output changes with "
                "a later token; is_decoder false?): there are no N-pass samples to equal"
            )
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
    model_class = _model_class(tiny)
    for implementation in ("sdpa", "eager"):
        try:
            return _build(model_class, tiny, implementation), name
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

