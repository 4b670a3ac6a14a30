"""Pack laid-out conversations into rows of at most `max_len` tokens.

Best-fit decreasing over a bounded window keeps rows full while the conversion still
streams: the window holds about `WINDOW_ROWS` rows' worth of tokens (measured on the
benchmark data at 32k tokens per row: 16 rows fill 93%, 64 rows 98%, 128 rows 99%). The
output depends only on the input order, never on timing.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from onepass_prep.convert.tree import Layout
from onepass_prep.format import IGNORE_INDEX

WINDOW_ROWS = 64


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
    num_trained: int  # labels that are not -100
    loss_weights: np.ndarray
    loss_units: int

    def __len__(self) -> int:
        return len(self.input_ids)


def join(items: list[tuple[str, Layout]]) -> Row:
    """Put trees one after another; each keeps its own roots, parents shift by offset."""
    parents, offset = [], 0
    for _, layout in items:
        parents.append(np.where(layout.seg_parents < 0, -1, layout.seg_parents + offset))
        offset += len(layout.seg_lens)
    layouts = [layout for _, layout in items]
    labels = np.concatenate([layout.labels for layout in layouts])
    return Row(
        np.concatenate([layout.input_ids for layout in layouts]),
        np.concatenate([layout.position_ids for layout in layouts]),
        labels,
        np.concatenate([layout.seg_lens for layout in layouts]),
        np.concatenate(parents).astype(np.int32),
        [conversation_id for conversation_id, _ in items],
        sum(layout.n_pass_tokens for layout in layouts),
        int(np.count_nonzero(labels != IGNORE_INDEX)),
        np.concatenate([layout.loss_weights for layout in layouts]),
        sum(layout.loss_units for layout in layouts),
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


def pack(
    items: Iterable[tuple[str, Layout]], max_len: int, enabled: bool = True
) -> Iterator[list[Row]]:
    """Rows in a deterministic order, in groups that use up every item taken so far.

    The end of a group is a point where no item is held back (see checkpoint.py). With
    `enabled` False, each conversation is a row and a group of its own.
    """
    if not enabled:
        for item in items:
            yield [join([item])]
        return
    buffer: list[tuple[str, Layout]] = []
    buffered = 0
    for item in items:
        buffer.append(item)
        buffered += len(item[1])
        if buffered >= WINDOW_ROWS * max_len:
            yield _flush(buffer, max_len)
            buffer, buffered = [], 0
    if buffer:
        yield _flush(buffer, max_len)


def _flush(buffer: list[tuple[str, Layout]], max_len: int) -> list[Row]:
    bins = best_fit_decreasing([len(layout) for _, layout in buffer], max_len)
    return [join([buffer[index] for index in group]) for group in bins]
