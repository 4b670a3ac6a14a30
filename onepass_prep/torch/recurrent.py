"""Linear-attention layers over a tree row: every segment starts from its parent's state.

A Gated DeltaNet layer (Qwen3.5, Qwen3-Next) reads the row in order: a short causal
convolution over the projected inputs, then the gated delta rule, whose recurrent state runs
from token to token. In a tree row a branch would read the state its sibling left, which no
mask can stop. It is exact instead when every token's convolution sees the inputs of its own
ancestors (the last ``kernel - 1`` tokens of its path from the root, zeros above a root) and
every chain of tokens starts the delta rule from the state its parent token ended with.

Read in row order, token ``j + 1`` is the first child of ``j`` unless ``j`` is a leaf
(``subtree_end[j] == j``, see masks.py); any other token's parent is its nearest ancestor, the
last earlier token that still sees it. A *chain* is a run of tokens each the only child of the
one before: a chain ends at a leaf or at a token with several children. The plan lays the
chains out level by level (a chain runs once the chain it continues has run); the chains of
one level go through the model's own chunked delta-rule kernel in one batched call, each
from its parent chain's final state (``initial_state``). Chains are padded at the end with
zero keys, decay and beta, which leave the state as it is. The convolution needs no levels:
each token gathers its ancestors' inputs directly.

The layer's own code runs as it is (projections, gated norm, output), and so does its kernel;
only the convolution and the delta rule's schedule are replaced, and only in calls that carry
a plan. Without one the layer runs its original forward, so an installed model generates as
usual. The cost is one kernel call per (level, length bucket): about two levels per turn.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # the runtime does not import transformers
    from transformers import PreTrainedModel

RECURRENT_PLAN_KEY = "onepass_recurrent_plan"
# The model config's name for the layers this module makes exact.
RECURRENT_LAYER_TYPES = ("linear_attention",)
# The delta-rule kernel's chunk: chains are grouped by their number of chunks (rounded up to a
# power of two), so padding costs at most about as much as the chain itself.
CHUNK = 64

Projections = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _qwen3_next_projections(layer: Any, hidden: torch.Tensor) -> Projections:
    query, key, value, z, b, a = layer.fix_query_key_value_ordering(
        layer.in_proj_qkvz(hidden), layer.in_proj_ba(hidden)
    )
    mixed = torch.cat([x.reshape(x.shape[0], x.shape[1], -1) for x in (query, key, value)], -1)
    return mixed, z, b, a


def _qwen3_5_projections(layer: Any, hidden: torch.Tensor) -> Projections:
    batch, length, _ = hidden.shape
    z = layer.in_proj_z(hidden).reshape(batch, length, -1, layer.head_v_dim)
    return layer.in_proj_qkv(hidden), z, layer.in_proj_b(hidden), layer.in_proj_a(hidden)


# Per Gated DeltaNet class: its projections up to the convolution, exactly as its forward does.
_PROJECTIONS: dict[str, Callable[[Any, torch.Tensor], Projections]] = {
    "Qwen3NextGatedDeltaNet": _qwen3_next_projections,
    "Qwen3_5GatedDeltaNet": _qwen3_5_projections,
    "Qwen3_5MoeGatedDeltaNet": _qwen3_5_projections,
}


def recurrent_layers(model: nn.Module) -> list[nn.Module]:
    """The model's linear-attention modules (the ``linear_attn`` of its decoder layers)."""
    layers = (getattr(m, "linear_attn", None) for m in model.modules())
    return [layer for layer in layers if isinstance(layer, nn.Module)]


def handles(model: PreTrainedModel) -> bool:
    """Whether this module makes every recurrent layer of ``model`` exact on tree rows: its
    config's layer types are attention or ``linear_attention``, and each linear-attention
    module is a Gated DeltaNet whose forward this module knows."""
    config = model.config.get_text_config()  # a vision-language model's text layers
    layer_types = getattr(config, "layer_types", None) or ()
    layers = recurrent_layers(model)
    return (
        any(t in RECURRENT_LAYER_TYPES for t in layer_types)
        and len(layers) == sum(t in RECURRENT_LAYER_TYPES for t in layer_types)
        and all(type(layer).__name__ in _PROJECTIONS for layer in layers)
    )


def install_tree_recurrence(model: PreTrainedModel) -> None:
    """Give each linear-attention module of ``model`` the tree forward, used in calls that
    carry ``RECURRENT_PLAN_KEY`` (the mask hook adds it); other calls run the original forward.
    Installing twice changes nothing."""
    if not handles(model):
        names = sorted({type(layer).__name__ for layer in recurrent_layers(model)})
        raise ValueError(f"no tree forward for the recurrent layers of this model: {names or 'none'}")
    for layer in recurrent_layers(model):
        if getattr(layer.forward, "onepass_tree_recurrence", False):
            continue
        original = layer.forward

        def forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any,
                    _original: Callable = original, **kwargs: Any) -> torch.Tensor:
            plan = kwargs.pop(RECURRENT_PLAN_KEY, None)
            if plan is None:
                return _original(hidden_states, *args, **kwargs)
            if args or kwargs.get("attention_mask") is not None:
                raise ValueError("a tree row's linear-attention layer takes its structure from the plan only")
            return tree_forward(self, hidden_states, plan)

        forward.onepass_tree_recurrence = True  # type: ignore[attr-defined]
        layer.forward = MethodType(forward, layer)


@dataclass(frozen=True)
class Group:
    """One kernel call: ``tokens[c, t]`` is the flat index of chain ``c``'s ``t``-th token
    (``B * L`` = padding). The initial states: ``sources`` lists ``(group, rows)``, the rows of
    an earlier group's final states (group ``-1``: that many zero states, for roots); laid end
    to end, row ``state_order[c]`` is chain ``c``'s. Only the states a call needs are copied."""

    tokens: torch.Tensor
    sources: list[tuple[int, torch.Tensor]]
    state_order: torch.Tensor


@dataclass(frozen=True)
class RecurrentPlan:
    """The tree of a collated batch for the linear-attention layers, over its ``B * L`` tokens.

    ``parents[j]`` is token ``j``'s tree parent (``B * L`` for a root, and for itself: a zero
    row), ``groups`` the kernel calls in run order, and ``output_rows[j]`` the row holding token
    ``j``'s output among the calls' outputs laid end to end. Built once per forward.
    """

    shape: tuple[int, int]
    parents: torch.Tensor
    groups: list[Group]
    output_rows: torch.Tensor
    levels: int


def _row_parents(ends: np.ndarray) -> np.ndarray:
    """Tree parent per token of one row, from ``subtree_end`` alone (``-1``: a root)."""
    length = len(ends)
    position = np.arange(length)
    parents = position - 1
    heads = np.flatnonzero(np.concatenate([[True], ends[:-1] == position[:-1]]))
    for head in heads.tolist():  # the nearest ancestor: the last earlier token still seeing it
        seeing = np.flatnonzero(ends[:head] >= head)
        parents[head] = seeing[-1] if len(seeing) else -1
    return parents


def recurrent_plan(subtree_end: torch.Tensor, device: torch.device | str | None = None) -> RecurrentPlan:
    """The chains, their levels and the kernel calls of a collated ``subtree_end`` ``[B, L]``,
    on ``device`` (default: ``subtree_end``'s). Built on the host: the calls' shapes are host
    numbers anyway."""
    device = subtree_end.device if device is None else torch.device(device)
    ends = subtree_end.cpu().numpy()
    batch, length = ends.shape
    total = batch * length
    parents = np.concatenate([_row_parents(row) + b * length for b, row in enumerate(ends)])
    parents = np.where(parents < np.repeat(np.arange(batch) * length, length), total, parents)
    children = np.bincount(parents, minlength=total + 1)[:total]
    flat = np.arange(total)
    continues = (parents == flat - 1) & (children[np.maximum(flat - 1, 0)] == 1)
    starts = np.flatnonzero(~continues)
    stops = np.append(starts[1:], total)
    chain_of = np.repeat(np.arange(len(starts)), stops - starts)
    level = np.zeros(len(starts), np.int64)
    parent_chain = np.where(parents[starts] < total, chain_of[np.minimum(parents[starts], total - 1)], -1)
    for c, p in enumerate(parent_chain.tolist()):
        if p >= 0:
            level[c] = level[p] + 1
    chunks = -(-(stops - starts) // CHUNK)
    bucket = 2 ** np.ceil(np.log2(chunks)).astype(np.int64)
    group_of, row_in_group = np.full(len(starts), -1), np.zeros(len(starts), np.int64)
    groups: list[Group] = []
    output_rows = np.zeros(total, np.int64)
    next_output = 0
    for lvl in range(int(level.max()) + 1 if len(starts) else 0):
        for size in np.unique(bucket[level == lvl]).tolist():
            members = np.flatnonzero((level == lvl) & (bucket == size))
            width = int((stops - starts)[members].max())
            tokens = np.full((len(members), width), total, np.int64)
            for i, c in enumerate(members.tolist()):
                n = stops[c] - starts[c]
                tokens[i, :n] = np.arange(starts[c], stops[c])
                output_rows[starts[c] : stops[c]] = next_output + i * width + np.arange(n)
            parent = parent_chain[members]
            source_group = np.where(parent >= 0, group_of[np.maximum(parent, 0)], -1)
            order = np.argsort(source_group, kind="stable")
            sources = [
                (int(g), torch.from_numpy(np.where(parent >= 0, row_in_group[np.maximum(parent, 0)], 0)[
                    order[source_group[order] == g]]).to(device))
                for g in np.unique(source_group).tolist()
            ]
            group_of[members], row_in_group[members] = len(groups), np.arange(len(members))
            next_output += tokens.size
            groups.append(Group(torch.from_numpy(tokens).to(device), sources,
                                torch.from_numpy(np.argsort(order)).to(device)))
    return RecurrentPlan(
        (batch, length),
        torch.from_numpy(np.append(parents, total)).to(device),
        groups,
        torch.from_numpy(output_rows).to(device),
        int(level.max()) + 1 if len(starts) else 0,
    )


def _with_zero_row(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros((1, *x.shape[1:]))])


def tree_conv(mixed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              parents: torch.Tensor) -> torch.Tensor:
    """The depthwise causal convolution of ``[N, C]`` inputs along each token's path to its
    root: ``out[j] = sum_d weight[:, K-1-d] * x[d-th ancestor of j]`` (+ bias), zeros above a
    root, as ``conv1d(padding=K-1)[:L]`` computes along a sequence."""
    taps = weight.shape[-1]
    padded = _with_zero_row(mixed)
    source = torch.arange(len(mixed), device=mixed.device)
    out = padded[source] * weight[:, taps - 1]
    for d in range(1, taps):
        source = parents[source]
        out = out + padded[source] * weight[:, taps - 1 - d]
    return out if bias is None else out + bias


def tree_delta_rule(kernel: Callable, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    g: torch.Tensor, beta: torch.Tensor, plan: RecurrentPlan) -> torch.Tensor:
    """The gated delta rule over ``[N, heads, dim]`` flat tokens, level by level of the plan:
    each chain through ``kernel`` (the model's own chunked kernel) from its parent's final state."""
    inputs = [_with_zero_row(x) for x in (query, key, value, g, beta)]
    finals: list[torch.Tensor] = []
    outputs = []
    for group in plan.groups:
        q, k, v, decay, b = (x[group.tokens] for x in inputs)
        shape = (v.shape[2], k.shape[-1], v.shape[-1])
        initial = torch.cat([
            finals[g].index_select(0, rows) if g >= 0
            else torch.zeros((len(rows), *shape), dtype=torch.float32, device=v.device)
            for g, rows in group.sources
        ]).index_select(0, group.state_order)
        out, final = kernel(q, k, v, g=decay, beta=b, initial_state=initial, output_final_state=True,
                            use_qk_l2norm_in_kernel=True)
        outputs.append(out.flatten(0, 1))
        finals.append(final)
    return torch.cat(outputs).index_select(0, plan.output_rows)


def tree_forward(layer: Any, hidden_states: torch.Tensor, plan: RecurrentPlan) -> torch.Tensor:
    """A Gated DeltaNet layer's forward (no cache) with the convolution and the delta rule run
    along the plan's tree instead of along the row. ``layer`` is a transformers module (Any:
    its attributes are the family's)."""
    batch, length, _ = hidden_states.shape
    if plan.shape != (batch, length):
        raise ValueError(f"recurrent plan is for [B, L] = {list(plan.shape)}, the call has {[batch, length]}")
    modeling = sys.modules[type(layer).__module__]  # the family's kernel and activations
    mixed, z, b, a = _PROJECTIONS[type(layer).__name__](layer, hidden_states)
    weight = layer.conv1d.weight.squeeze(1)
    mixed = tree_conv(mixed.flatten(0, 1).to(weight.dtype), weight, layer.conv1d.bias, plan.parents)
    mixed = modeling.ACT2FN[layer.activation](mixed).to(hidden_states.dtype)
    query, key, value = torch.split(mixed, [layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
    tokens = batch * length
    query = query.reshape(tokens, -1, layer.head_k_dim)
    key = key.reshape(tokens, -1, layer.head_k_dim)
    value = value.reshape(tokens, -1, layer.head_v_dim)
    b, a = b.reshape(tokens, -1), a.reshape(tokens, -1)
    beta = b.sigmoid()
    g = -layer.A_log.float().exp() * nn.functional.softplus(a.float() + layer.dt_bias)
    core = tree_delta_rule(modeling.torch_chunk_gated_delta_rule, query, key, value, g, beta, plan)
    core = layer.norm(core.reshape(-1, layer.head_v_dim), z.reshape(-1, layer.head_v_dim))
    return layer.out_proj(core.reshape(batch, length, -1))
