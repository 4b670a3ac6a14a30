"""Tree arithmetic on segment tables, vectorised over many rows at once.

Segments are in depth-first pre-order, so the subtree of a segment is the contiguous run of
segments from itself to the last segment of its subtree. At token level the same holds: the
descendants of token ``kv`` are exactly the tokens ``kv + 1 .. subtree_end[kv]``. The whole
attention rule of docs/FORMAT.md then reads ``kv <= q <= subtree_end[kv]``, one O(L) integer
per token, from which every mask is built on device.
"""

from __future__ import annotations

import numpy as np


def subtree_last(parents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per segment: the largest segment index in its subtree, and its number of descendants.

    ``parents`` holds global indices (``-1`` for roots) with every parent before its child;
    rows are concatenated, so one call serves a whole batch. Each segment pushes its index to
    every ancestor, one tree level per step: the loop runs once per level of depth.
    """
    n = len(parents)
    index = np.arange(n)
    last = index.copy()
    descendants = np.zeros(n, np.int64)
    ancestor = parents.astype(np.int64)
    live = ancestor >= 0
    while live.any():
        source, target = index[live], ancestor[live]
        np.maximum.at(last, target, source)
        np.add.at(descendants, target, 1)
        ancestor[live] = parents[target]
        live = ancestor >= 0
    return last, descendants


def token_subtree_end(seg_lens: np.ndarray, seg_parents: np.ndarray) -> np.ndarray:
    """``subtree_end`` per token of one row: the index of the last token it can be seen by."""
    lens = seg_lens.astype(np.int64)
    last_token = np.cumsum(lens) - 1
    last_segment, _ = subtree_last(seg_parents)
    return np.repeat(last_token[last_segment], lens)


def token_parents(seg_lens: np.ndarray, seg_parents: np.ndarray) -> np.ndarray:
    """Tree parent per token of one row: ``j - 1``, or for a segment's first token the last
    token of its parent segment (``-1`` for a root)."""
    lens = seg_lens.astype(np.int64)
    starts = np.cumsum(lens) - lens
    parents = np.arange(int(lens.sum()), dtype=np.int64) - 1
    parents[starts] = np.where(seg_parents >= 0, (starts + lens - 1)[np.maximum(seg_parents, 0)], -1)
    return parents


def root_segments(seg_parents: np.ndarray) -> list[np.ndarray]:
    """Per root (tree) of one row, its segments: the root and the run of segments up to the
    next root (pre-order). What `conversation_segments` is when each tree holds one
    conversation (format v1 and v2)."""
    roots = np.flatnonzero(np.asarray(seg_parents) < 0)
    ends = np.append(roots[1:], len(seg_parents))
    return [np.arange(root, end, dtype=np.int32) for root, end in zip(roots, ends, strict=True)]
