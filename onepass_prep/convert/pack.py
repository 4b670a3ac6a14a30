"""Pack laid-out conversations into rows of at most `max_len` tokens.

A shard's conversations (one chunk of the input, see work.py) are packed together by
best-fit decreasing, which fills rows well once a chunk holds many rows' worth of tokens
(on the benchmark data at 32k tokens per row: 16 rows' worth fill 93%, 64 rows' 98%, 128
rows' 99%). The rows depend only on the chunk's conversations and their order.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from onepass_prep.convert.tree import Layout
from onepass_prep.format import IGNORE_INDEX


@dataclass
class Row:
    """One training sequence per docs/FORMAT.md: one or more trees side by side."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    labels: np.ndarray
    seg_lens: np.ndarray
    seg_parents: np.ndarray
    conversation_ids: list[str]
    n_pass_tokens: int
    n_pass_pairs: int
    num_trained: int  # labels that are not -100
    loss_weights: np.ndarray
    loss_units: int
    conversation_segments: list[np.ndarray]  # per conversation id, the segments it uses
    unshared_tokens: int  # the tokens of its conversations laid out one tree each

    def __len__(self) -> int:
        return len(self.input_ids)


Tree = tuple[list[str], Layout]  # a tree and the ids of the conversations it holds


def join(items: list[Tree]) -> Row:
    """Put trees one after another; each keeps its own roots, parents shift by offset."""
    parents, segments, offset = [], [], 0
    for _, layout in items:
        parents.append(np.where(layout.seg_parents < 0, -1, layout.seg_parents + offset))
        segments += [owned + offset for owned in layout.conversation_segments]
        offset += len(layout.seg_lens)
    layouts = [layout for _, layout in items]
    labels = np.concatenate([layout.labels for layout in layouts])
    return Row(
        np.concatenate([layout.input_ids for layout in layouts]),
        np.concatenate([layout.position_ids for layout in layouts]),
        labels,
        np.concatenate([layout.seg_lens for layout in layouts]),
        np.concatenate(parents).astype(np.int32),
        [conversation_id for ids, _ in items for conversation_id in ids],
        sum(layout.n_pass_tokens for layout in layouts),
        sum(layout.n_pass_pairs for layout in layouts),
        int(np.count_nonzero(labels != IGNORE_INDEX)),
        np.concatenate([layout.loss_weights for layout in layouts]),
        sum(layout.loss_units for layout in layouts),
        segments,
        sum(layout.unshared_tokens for layout in layouts),
    )


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of total length <= capacity, longest items first."""
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), kept sorted
    for index in order:
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot == len(free):
            bins.append([index])
            bisect.insort(free, (capacity - lengths[index], len(bins) - 1))
            continue
        space, bin_index = free.pop(slot)
        bins[bin_index].append(index)
        bisect.insort(free, (space - lengths[index], bin_index))
    return bins


def pack(items: list[Tree], max_len: int, enabled: bool = True) -> list[Row]:
    """Rows in a deterministic order; with `enabled` False, one row per tree."""
    if not enabled:
        return [join([item]) for item in items]
    bins = best_fit_decreasing([len(layout) for _, layout in items], max_len)
    return [join([items[index] for index in group]) for group in bins]
