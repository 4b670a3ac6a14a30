"""The attention mask of a row, downsampled into cells of b x b tokens.

A 32k-token row has a billion (query, key) pairs, so the mask is never built. Counts come
from the segment table instead: in pre-order, token q sees key kv iff
kv <= q <= subtree_end[kv] (FORMAT.md), so the visible pairs between a run of keys
in one segment and a run of queries have a closed form. The cost is O(parts x cells).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onepass_prep.inspection.roles import Part, Role
from onepass_prep.inspection.runs import ShardRow


@dataclass
class Grid:
    edges: np.ndarray  # cell boundaries in tokens (cells + 1 of them)
    visible: np.ndarray  # [role, query cell, key cell]: visible pairs whose key has that role
    causal: np.ndarray  # [query cell, key cell]: pairs with key <= query

    @property
    def block(self) -> int:
        return int(self.edges[1] - self.edges[0])

    @property
    def fraction(self) -> np.ndarray:
        """Visible share of the pairs causality allows (0 where it allows none)."""
        return self.visible.sum(axis=0) / np.maximum(self.causal, 1)

    @property
    def role(self) -> np.ndarray:
        """Per cell, the key role with the most visible pairs."""
        return self.visible.argmax(axis=0)


def cell_edges(length: int, cells: int) -> np.ndarray:
    """Boundaries of cells of equal size b = ceil(length / cells); the last may be shorter."""
    block = -(-length // max(1, cells))
    return np.append(np.arange(0, length, block), length)


def mask_grid(row: ShardRow, parts: list[Part], cells: int) -> Grid:
    """Count visible pairs per cell and key role, for at most `cells` x `cells` cells."""
    edges = cell_edges(len(row), cells)
    q0, q1 = edges[:-1], edges[1:]
    visible = np.zeros((len(Role), len(q0), len(q0)), np.int64)
    causal = np.zeros((len(q0), len(q0)), np.int64)
    for column, (k0, k1) in enumerate(zip(q0.tolist(), q1.tolist(), strict=True)):
        causal[:, column] = _pairs(k0, k1, len(row), q0, q1)
    for part in parts:
        end = int(row.subtree_end[part.start]) + 1  # the same for every token of the segment
        first = int(np.searchsorted(edges, part.start, side="right")) - 1
        last = int(np.searchsorted(edges, part.end - 1, side="right")) - 1
        for column in range(first, last + 1):
            keys = max(part.start, int(edges[column])), min(part.end, int(edges[column + 1]))
            visible[part.role, :, column] += _pairs(*keys, end, q0, q1)
    return Grid(edges, visible, causal)


def _pairs(u: int, v: int, end: int, q0: np.ndarray, q1: np.ndarray) -> np.ndarray:
    """Number of (q, kv) with kv in [u, v), q in [q0, q1) and kv <= q < end, per query cell.

    Keys before the query cell see all its queries below `end`; a key inside it sees the
    queries from itself up to `end`, an arithmetic series.
    """
    high = np.minimum(end, q1)
    before = np.clip(np.minimum(v, q0) - u, 0, None) * np.clip(high - q0, 0, None)
    low, up = np.maximum(u, q0), np.minimum(v, high)
    count = np.clip(up - low, 0, None)
    return before + count * (2 * high - low - up + 1) // 2
