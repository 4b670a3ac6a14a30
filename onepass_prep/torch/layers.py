"""What each layer of a model does across positions, read the way transformers reads it.

One pass over a tree row equals N separate passes only if every layer mixes positions through
attention whose mask says who sees whom: full attention (the tree rule), a sliding window
(the tree rule and ``p[q] - p[kv] < W``) or chunked attention (the tree rule and
``p[q] // C == p[kv] // C``), with ``p`` the row's ``position_ids``; or mixes none (Nemotron-H's
``mlp`` and ``moe`` blocks). A layer that reads the row in order (linear attention, a
state-space scan, a short convolution) carries its state from one branch into its sibling,
and no mask can stop that, unless the recurrent package drives its mixer: then each chain of
tokens starts from its parent's state and the layer is exact too (kind ``recurrent``, or an
attention kind with ``mixer`` set where attention and the mixer run side by side, as in
Falcon-H1). Everything else is refused here, in ``check_layers``, the one place that raises.

The verdict comes from the config (``layer_types`` and the window and chunk fields, what
transformers' own mask functions read) and from the layers' modules (Falcon-H1's config
says nothing, yet a state-space mixer runs beside every attention; Moshi's config has a
window its code builds no mask for), never from a list of model names: an architecture
transformers adds later is refused unless it says, in these terms, that it is one of these
kinds.
"""

from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import nn

from .recurrent import mixer_for, unsupported

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

# "recurrent": a mixer the recurrent package runs from each chain's parent state, no attention;
# "positionwise": a layer that mixes no positions (an MLP or MoE block of its own).
Attention = Literal["full", "sliding", "chunked", "recurrent", "positionwise"]

_ATTENTION_TYPES: dict[str, Attention] = {
    "full_attention": "full",
    "sliding_attention": "sliding",
    "chunked_attention": "chunked",
}
# The kinds a mask makes exact, and so the ones an attention refusal takes back.
_MASKED = frozenset(_ATTENTION_TYPES.values())
_READ_IN_ORDER = {"linear_attention", "mamba", "mamba2", "conv", "recurrent", "ssm"}
# A layer with attention and a recurrent mixer side by side (Falcon-H1): full attention, and
# exact only if the mixer is driven.
_PARALLEL = "hybrid"
_POSITIONWISE = {"mlp", "moe"}
# Config fields about windows that transformers turns into ``layer_types`` (or reads as the
# window itself); any other window-like field is a mask this module does not know.
_KNOWN_FIELDS = {
    "sliding_window", "attention_chunk_size", "use_sliding_window", "max_window_layers",
    "sliding_window_pattern", "_sliding_window_pattern", "prefix_dense_sliding_window_pattern",
}
_WINDOW_FIELD = re.compile(r"window|local_attention|attention_types?$|attn_type")
_ONLY_ATTENTION = (
    "only full, sliding-window and chunked attention layers can be made exact by a mask (a layer "
    "that reads the row in order carries one branch's state into its sibling); train this model "
    "the usual N-pass way, one sample per sequence"
)


@dataclass(frozen=True)
class LayerKind:
    """One layer's verdict. ``layer_type`` is the key the model looks its mask up by
    (``config.layer_types[i]``; None where the config has none and one mask serves every
    layer). ``attention`` is None for a refused layer, whose ``refusal`` says why."""

    layer_type: str | None
    attention: Attention | None
    window: int | None = None
    chunk: int | None = None
    refusal: str | None = None
    mixer: str | None = None  # the recurrent mixer's kind (recurrent/), alone or beside attention

    def describe(self) -> str:
        beside = f" beside {self.mixer}, each chain from its parent's state" if self.mixer else ""
        if self.attention == "sliding":
            return f"sliding window {self.window}{beside}"
        if self.attention == "chunked":
            return f"chunks of {self.chunk}{beside}"
        if self.attention == "full":
            return f"full attention{beside}"
        if self.attention == "recurrent":
            return f"{self.mixer}, each chain from its parent's state"
        if self.attention == "positionwise":
            return "no mixing across positions"
        return f"{self.layer_type or 'a layer'} ({self.refusal})"


def layer_kinds(model: PreTrainedModel) -> list[LayerKind]:
    """The kind of each decoder layer, in order (see the module docstring)."""
    config = model.config.get_text_config()
    whole = _whole_model_refusal(config)
    types = getattr(config, "layer_types", None)
    count = int(config.num_hidden_layers)
    kinds = [
        LayerKind(None, None, refusal=whole) if whole
        else _kind(config, types[i] if types is not None else None)
        for i in range(count)
    ]
    layers = _decoder_layers(model, count)
    windows = {k.window for k in kinds if k.attention == "sliding"}
    if types is None and windows and layers and not _builds_window_masks(layers[0]):
        unapplied = _UNAPPLIED_WINDOW.format(windows.pop(), type(layers[0]).__module__)
        kinds = [LayerKind(k.layer_type, None, refusal=unapplied) if k.attention == "sliding" else k for k in kinds]
    for i, layer in enumerate(layers):
        mixer = _ordered_mixer(layer)
        if mixer is not None:
            kinds[i] = _with_mixer(kinds[i], mixer)
    refusal = _attention_refusal(model, config, count)
    if refusal:  # attention that a mask cannot fix: its positions or its causality are not the tree's
        kinds = [LayerKind(k.layer_type, None, refusal=refusal) if k.attention in _MASKED else k for k in kinds]
    return kinds


def _with_mixer(kind: LayerKind, module: nn.Module) -> LayerKind:
    """A layer's verdict once a mixer that reads the row in order was found in it."""
    driven = mixer_for(module)
    if driven is None:
        return LayerKind(kind.layer_type, None, refusal=unsupported(module))
    if kind.layer_type in _READ_IN_ORDER:
        return LayerKind(kind.layer_type, "recurrent", mixer=driven.kind)
    if kind.layer_type == _PARALLEL or kind.attention is not None:
        return LayerKind(kind.layer_type, kind.attention or "full", kind.window, kind.chunk, mixer=driven.kind)
    return kind


def check_layers(model: PreTrainedModel) -> list[LayerKind]:
    """``layer_kinds``, or the one-line ``ValueError`` for a model no mask can make exact."""
    kinds = layer_kinds(model)
    refused = sorted({k.describe() for k in kinds if k.attention is None})
    if refused:
        name = type(model).__name__
        raise ValueError(f"{name} cannot train on tree rows exactly: layers {'; '.join(refused)}; {_ONLY_ATTENTION}")
    return kinds


def _kind(config: PreTrainedConfig, layer_type: str | None) -> LayerKind:
    if layer_type is None:  # one kind for every layer, from the window and chunk fields
        chunk = getattr(config, "attention_chunk_size", None)
        window = getattr(config, "sliding_window", None)
        if chunk is not None:
            return LayerKind(None, "chunked", chunk=int(chunk))
        if window is not None:
            return LayerKind(None, "sliding", window=int(window))
        return LayerKind(None, "full")
    attention = _ATTENTION_TYPES.get(layer_type)
    if attention == "sliding":
        window = getattr(config, "sliding_window", None)
        if window is None:
            return LayerKind(layer_type, None, refusal="a sliding layer without a sliding_window")
        return LayerKind(layer_type, "sliding", window=int(window))
    if attention == "chunked":
        chunk = getattr(config, "attention_chunk_size", None)
        if chunk is None:
            return LayerKind(layer_type, None, refusal="a chunked layer without an attention_chunk_size")
        return LayerKind(layer_type, "chunked", chunk=int(chunk))
    if attention == "full":
        return LayerKind(layer_type, "full")
    if layer_type in _POSITIONWISE:
        return LayerKind(layer_type, "positionwise")
    if layer_type in _READ_IN_ORDER or layer_type == _PARALLEL:
        return LayerKind(layer_type, None, refusal="reads the row in order")
    return LayerKind(layer_type, None, refusal="a layer type onepass-prep does not know")


_UNAPPLIED_WINDOW = (
    "sliding_window={} in the config, yet {} builds no sliding-window mask "
    "(create_sliding_window_causal_mask): which window the model applies is unknown"
)


def _builds_window_masks(layer: nn.Module) -> bool:
    """Whether the code that defines a decoder layer has transformers' sliding-window mask.
    With one ``sliding_window`` and no ``layer_types``, a model windows its attention through
    that function (Mistral, Phi-3, Starcoder2); Moshi's config carries a window its code never
    applies, so the config alone does not say which mask N passes would see."""
    return hasattr(sys.modules[type(layer).__module__], "create_sliding_window_causal_mask")


def _whole_model_refusal(config: PreTrainedConfig) -> str | None:
    if getattr(config, "is_causal", True) is False or getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    for field, value in sorted(config.to_dict().items()):
        if _WINDOW_FIELD.search(field) and field not in _KNOWN_FIELDS and value not in (None, False, 0, [], ""):
            return f"config field {field}={value!r}, a mask onepass-prep does not know"
    return None


def _attention_refusal(model: nn.Module, config: PreTrainedConfig, count: int) -> str | None:
    """Why attention layers that the config calls full, sliding or chunked still differ from
    N passes, read from the modules: BERT-style self-attention built non-causal
    (``is_decoder`` false), ALiBi biases built from the row index (MPT, Falcon with
    ``alibi``), or positions computed from the row index because no module on the way to the
    layers takes ``position_ids`` (BART and its kin, TrOCR, Bloom): a branch deeper in the row
    would get its row offset as its position."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if not names:  # an unknown layout: nothing to read
        return None
    first_layer = model.get_submodule(f"{names[0]}.0")
    causal = [m.is_causal for m in first_layer.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if causal and not any(causal):
        return "bidirectional self-attention, is_causal false: a decoder needs is_decoder=True"
    if getattr(config, "alibi", False) or getattr(getattr(config, "attn_config", None), "alibi", False):
        return "ALiBi attention, whose biases come from the row index, not position_ids"
    parts = names[0].split(".")
    path = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts))]
    if not any("position_ids" in inspect.signature(m.forward).parameters for m in path):
        return "attention whose positions come from the row index, not position_ids"
    return None


def _decoder_layers(model: nn.Module, count: int) -> list[nn.Module]:
    """The decoder's layer list: the first ``ModuleList`` of ``num_hidden_layers`` entries
    (``model.model.layers`` in most families). An unknown layout yields nothing to scan."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return list(module)
    return []


def _ordered_mixer(layer: nn.Module) -> nn.Module | None:
    """A submodule that mixes positions in row order: a causal convolution over the sequence
    (LFM2's short convolution, and the one in front of every Mamba and Gated DeltaNet mixer), a
    state-space decay ``A_log`` (Mamba, DeltaNet) or lightning attention's ``slope_rate``."""
    for child in [layer, *layer.children()]:
        modules = [child] if child is layer else list(child.modules())
        if any(isinstance(m, nn.Conv1d) or "A_log" in m._parameters or "slope_rate" in m._buffers
               for m in modules):
            return child
    return None


def row_limit(model: PreTrainedModel) -> tuple[int, str] | None:
    """The longest row (padded length) that stays exact, and why, where a layer reads the row
    index instead of ``position_ids``: Llama 4 scales the queries of its NoPE layers by
    ``log1p(floor((index + 1) / floor_scale))``, which is 0 for both the row index and the
    N-pass position while the row is shorter than ``floor_scale``."""
    config = model.config.get_text_config()
    no_rope = getattr(config, "no_rope_layers", None) or []
    if not getattr(config, "attn_temperature_tuning", False) or all(no_rope):
        return None
    longest = int(config.floor_scale) - 1
    return longest, (
        f"{type(model).__name__}'s attention temperature tuning (attn_temperature_tuning, NoPE "
        f"layers) reads the row index, not position_ids, and equals N-pass only in rows of at most "
        f"floor_scale - 1 = {longest} tokens; convert with --max-seq-len {longest} or less"
    )
