"""The tree schedule every recurrent mixer shares: the plan, the ancestor windows of a causal
convolution and the chain runner that hands each chain its parent chain's final state.

Read in row order, token ``j + 1`` is the first child of ``j`` unless ``j`` is a leaf
(``subtree_end[j] == j``, see masks.py); any other token's parent is its nearest ancestor, the
last earlier token that still sees it. A *chain* is a run of tokens each the only child of the
one before: a chain ends at a leaf or at a token with several children. The plan lays the
chains out level by level (a chain runs once the chain it continues has run); the chains of
one level and length bucket go through the mixer's own scan kernel in one batched call, each
from its parent chain's final state. Chains are padded at the end with inputs that leave the
state as it is (each adapter says which). A convolution needs no levels: each token gathers
the inputs of its last ``kernel - 1`` ancestors (zeros above a root) and the mixer's own
convolution kernel runs over that window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Chains are grouped by their number of CHUNK-token chunks (rounded up to a power of two), so
# padding costs at most about as much as the chain itself. Any grouping is exact; this one
# keeps the calls few and the padding small.
CHUNK = 64

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


def ancestor_windows(inputs: torch.Tensor, parents: torch.Tensor, taps: int) -> torch.Tensor:
    """``[N, C]`` flat inputs -> ``[N, C, taps]``: each token's inputs and those of its
    ``taps - 1`` nearest ancestors, oldest first, zeros above a root: the sequence a causal
    convolution of ``taps`` taps reads for that token in its own N-pass sample."""
    padded = _with_zero_row(inputs)
    source = torch.arange(len(inputs), device=inputs.device)
    window = [padded[source]]
    for _ in range(1, taps):
        source = parents[source]
        window.append(padded[source])
    return torch.stack(window[::-1], dim=-1)


def tree_conv(inputs: torch.Tensor, parents: torch.Tensor, taps: int,
              convolve: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A causal convolution of ``[N, C]`` flat inputs along each token's path to its root.
    ``convolve`` is the mixer's own convolution (``[1, C, T] -> [1, C, T]``, causal, as it
    runs over a sequence). The ancestor windows go to it end to end as one sequence: the last
    position of a window reads ``taps`` positions, its own window and nothing before, and each
    token keeps that position. One sequence, not ``N`` windows of ``taps``: a depthwise
    convolution's backward over a batch of ``N`` runs ``N`` small kernels (seconds per layer
    on CPU for a few thousand tokens)."""
    windows = ancestor_windows(inputs, parents, taps)
    sequence = windows.permute(1, 0, 2).reshape(1, inputs.shape[1], -1)
    return convolve(sequence)[0, :, taps - 1 :: taps].T


Scan = Callable[[list[torch.Tensor], torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def run_chains(scan: Scan, inputs: Sequence[torch.Tensor], zero_state: torch.Tensor,
               plan: RecurrentPlan) -> torch.Tensor:
    """A recurrence over ``[N, ...]`` flat per-token inputs, level by level of the plan: each
    group of chains through ``scan`` (the mixer's own kernel: ``[chains, width, ...]`` inputs
    and ``[chains, ...]`` initial states -> outputs and final states), each chain from its
    parent's final state (``zero_state`` for a root). Padding rows are zeros."""
    padded = [_with_zero_row(x) for x in inputs]
    finals: list[torch.Tensor] = []
    outputs = []
    for group in plan.groups:
        initial = torch.cat([
            finals[g].index_select(0, rows) if g >= 0 else zero_state.expand(len(rows), *zero_state.shape)
            for g, rows in group.sources
        ]).index_select(0, group.state_order)
        out, final = scan([x[group.tokens] for x in padded], initial)
        outputs.append(out.flatten(0, 1))
        finals.append(final)
    return torch.cat(outputs).index_select(0, plan.output_rows)
