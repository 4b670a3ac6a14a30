"""Exact tree attention without an L x L mask: small attention calls along the tree's chains.

Read in row order, token ``j + 1`` is the child of token ``j`` unless ``j`` is a leaf
(``subtree_end[j] == j``, see masks.py). So a row splits into *chains*, each ending at a leaf.
The queries of a chain see the chain causally and, before it, the chain's *context*: the
ancestors of its first token, every one of them visible to the whole chain. Attention runs
per chain over context + chain only, so it costs about the visible (q, kv) pairs and never
builds or computes anything L x L. A row has one chain per leaf (about one per N-pass
sample); chains with context are cut into pieces (see PIECE).

Tokens that see only themselves (padding, single-token trees) output their own value: a
softmax over one key is 1, so that is exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .masks import key_limits

TREE_ATTENTION = "onepass_tree"
PLAN_KEY = "onepass_tree_plan"

SpanKind = Literal["causal", "self"]

# A chain with context is cut into pieces of at most PIECE queries, each attending to the
# context and to the chain up to its own last query: one mask over a whole chain of n tokens
# would spend n^2 / 2 pairs on the chain's hidden upper triangle, a piece spends PIECE^2 / 2.
PIECE = 256


@dataclass(frozen=True)
class TreePlan:
    """Which keys each span of queries attends to, over the batch flattened to ``B * L`` tokens.

    Spans cover the flattened tokens in order. Span ``i`` has ``query_sizes[i]`` queries and
    attends to the next ``key_sizes[i]`` entries of ``keys`` (flat token indices) through
    ``masks[i]``: a bool ``[queries, keys]`` mask, ``"causal"`` (a chain with no context) or
    ``"self"`` (tokens that see only themselves). Built once per forward, used by every layer.

    For models with sliding-window or chunked layers, ``layer_limits[i]`` is layer ``i``'s
    ``(window, chunk)`` and ``positions`` the flattened ``position_ids``: such a layer's span
    masks also keep ``p[q] < limit[kv]`` (masks.py), built by the first layer of each kind
    and kept in ``limited``.
    """

    shape: tuple[int, int]
    keys: torch.Tensor
    query_sizes: list[int]
    key_sizes: list[int]
    masks: list[torch.Tensor | SpanKind]
    positions: torch.Tensor | None = None
    layer_limits: tuple[tuple[int | None, int | None], ...] = ()
    limited: dict[tuple[int | None, int | None], list[torch.Tensor | SpanKind]] = field(
        default_factory=dict, compare=False
    )

    def masks_for(self, window: int | None, chunk: int | None) -> list[torch.Tensor | SpanKind]:
        """The span masks of a layer with this window or chunk size (None, None: the tree's)."""
        if window is None and chunk is None:
            return self.masks
        if (window, chunk) not in self.limited:
            if self.positions is None:
                raise ValueError("a window or chunked layer needs a plan built with position_ids")
            limits = key_limits(self.positions[self.keys], window, chunk).split(self.key_sizes)
            queries = self.positions.split(self.query_sizes)
            out: list[torch.Tensor | SpanKind] = []
            for q, limit, mask in zip(queries, limits, self.masks, strict=True):
                if isinstance(mask, str) and mask == "self":  # a token always sees itself
                    out.append(mask)
                    continue
                if isinstance(mask, str):
                    mask = torch.ones(len(q), len(q), dtype=torch.bool, device=q.device).tril()
                out.append(mask & (q[:, None] < limit[None, :]))
            self.limited[(window, chunk)] = out
        return self.limited[(window, chunk)]


def _chains(row: np.ndarray) -> Iterator[tuple[int, int, np.ndarray | None]]:
    """``(start, stop, context)`` per chain of one row; context None for tokens alone.

    Consecutive tokens that see only themselves (padding, single-token trees) come as one
    run, so a long padded tail costs one step.
    """
    position = np.arange(len(row))
    leaf = row == position
    seen_before = np.maximum.accumulate(np.concatenate([[-1], row[:-1]]))
    alone = leaf & (seen_before < position)  # a leaf with no ancestor
    chain_start = np.concatenate([[True], leaf[:-1]])
    starts = np.flatnonzero(chain_start & ~(alone & np.concatenate([[False], alone[:-1]])))
    path: list[tuple[int, int]] = []  # token ranges from a root down to the previous chain
    for start, stop in zip(starts.tolist(), [*starts[1:].tolist(), len(row)], strict=True):
        if alone[start]:
            yield start, stop, None
            continue
        # The context is the prefix of the path whose tokens are still seen at `start`
        # (subtree_end never grows going down a path).
        while path and row[path[-1][0]] < start:
            path.pop()
        if path:
            first, last = path[-1]
            path[-1] = (first, first + int(np.count_nonzero(row[first:last] >= start)))
        yield start, stop, np.concatenate([np.arange(*r) for r in path]) if path else np.arange(0)
        path.append((start, stop))


Span = tuple[np.ndarray, np.ndarray, torch.Tensor | SpanKind]


def _spans(row: np.ndarray, device: torch.device) -> Iterator[Span]:
    """``(queries, keys, mask)`` per attention call of one row, in row order."""
    for start, stop, context in _chains(row):
        if context is None or not len(context):
            queries = np.arange(start, stop)
            yield queries, queries, "self" if context is None else "causal"
            continue
        for first in range(start, stop, PIECE):
            queries = np.arange(first, min(first + PIECE, stop))
            visible = np.concatenate([context, np.arange(start, queries[-1] + 1)])
            q, kv = queries[:, None], visible[None, :]  # the FORMAT rule on these pairs
            yield queries, visible, torch.from_numpy((kv <= q) & (q <= row[kv])).to(device)


def tree_plan(
    subtree_end: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    layer_limits: tuple[tuple[int | None, int | None], ...] = (),
) -> TreePlan:
    """The spans of every row of a collated ``subtree_end`` ``[B, L]``, on its device; with
    ``position_ids`` and each layer's ``(window, chunk)`` for models with such layers."""
    ends = subtree_end.cpu().numpy()
    batch, length = ends.shape
    keys: list[np.ndarray] = []
    query_sizes: list[int] = []
    key_sizes: list[int] = []
    masks: list[torch.Tensor | SpanKind] = []
    for b, row in enumerate(ends):
        for queries, visible, mask in _spans(row, subtree_end.device):
            keys.append(visible + b * length)
            query_sizes.append(len(queries))
            key_sizes.append(len(visible))
            masks.append(mask)
    flat_keys = torch.from_numpy(np.concatenate(keys)).to(subtree_end.device)
    positions = None if position_ids is None else position_ids.to(subtree_end.device).reshape(-1)
    return TreePlan((batch, length), flat_keys, query_sizes, key_sizes, masks, positions, layer_limits)


def _flat(states: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[1, H, B * L, D]``: rows one after another, as the plan counts."""
    batch, heads, length, dim = states.shape
    return states.transpose(0, 1).reshape(1, heads, batch * length, dim)


def tree_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: ``[B, H, L, D]`` in, ``[B, L, H, D]`` out (GQA allowed).

    Reads the tree from ``kwargs[PLAN_KEY]`` (the mask hook puts it there) and refuses
    anything it would otherwise silently ignore: a missing plan, a mask, dropout, a window
    the plan does not hold, a softcap, attention sinks. A window or chunked layer (the plan's
    ``layer_limits`` at the module's ``layer_idx``) attends through its limited span masks.
    """
    plan: TreePlan | None = kwargs.get(PLAN_KEY)
    batch, heads, length, dim = query.shape
    if plan is None:
        raise ValueError(
            f"{TREE_ATTENTION!r} attention needs '{PLAN_KEY}' in the model call: use "
            f"install_mask_hook(model, kind='tree'), or set another attn_implementation"
        )
    if plan.shape != (batch, length):
        raise ValueError(f"tree plan is for [B, L] = {list(plan.shape)}, the call has {[batch, length]}")
    if attention_mask is not None:
        raise ValueError(f"{TREE_ATTENTION!r} attention takes its tree from the plan, not a mask")
    window = chunk = None
    if plan.layer_limits:
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise ValueError(f"{TREE_ATTENTION!r} attention needs the layer's layer_idx for its window")
        window, chunk = plan.layer_limits[layer]
    if dropout or kwargs.get("sliding_window") not in (None, window) or kwargs.get("softcap") is not None:
        raise ValueError(f"{TREE_ATTENTION!r} attention has no dropout, sliding window or softcap")
    if kwargs.get("s_aux") is not None:
        raise ValueError(
            f"{TREE_ATTENTION!r} attention has no attention sinks (s_aux): use attn_implementation "
            "'eager' or 'flex_attention'"
        )
    groups = heads // key.shape[1]
    gathered_keys = _flat(key).index_select(2, plan.keys).split(plan.key_sizes, 2)
    gathered_values = _flat(value).index_select(2, plan.keys).split(plan.key_sizes, 2)
    queries = _flat(query).split(plan.query_sizes, 2)
    attend = partial(F.scaled_dot_product_attention, scale=scaling, enable_gqa=True)
    outputs = []
    masks = plan.masks_for(window, chunk)
    for q, k, v, mask in zip(queries, gathered_keys, gathered_values, masks, strict=True):
        if isinstance(mask, torch.Tensor):
            outputs.append(attend(q, k, v, mask))
        elif mask == "causal":
            outputs.append(attend(q, k, v, is_causal=True))
        else:
            outputs.append(v.repeat_interleave(groups, 1))
    out = torch.cat(outputs, 2).view(heads, batch, length, value.shape[-1])  # MLA: v dim != qk dim
    return out.permute(1, 2, 0, 3).contiguous(), None


def register_tree_attention() -> None:
    """Make ``attn_implementation="onepass_tree"`` known to transformers (imported only here).

    Under a name transformers has no mask function for, ``create_causal_mask`` returns None
    before it looks at position ids, so no mask (and no packed-document guess) is built.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(TREE_ATTENTION, tree_attention)
