"""Trained (context, target) pairs as hashed keys, in time linear in the tokens: the
comparison `verify` and the model check share.

A pair is keyed by a polynomial hash of its context, the context's length and the target.
For a sample, the hash of every prefix comes from one cumulative sum; for a row, a
token's path hash is its parent's plus its own term, so both sides cost O(tokens). Four
moduli near 2^31 make an accidental collision negligible (about 2^-120 per pair of
different contexts of one length).
"""

from __future__ import annotations

import numpy as np

from onepass_prep.format import IGNORE_INDEX
from onepass_prep.inspection.runs import ShardRow

MODULI = np.array([2147483647, 2147483629, 2147483587, 2147483563], np.int64)
BASES = np.array([1103515245, 1664525013, 1987654321, 1234567891], np.int64)


class Powers:
    """BASES**i mod MODULI for i < n, grown by doubling (products stay below 2**62)."""

    def __init__(self) -> None:
        self.table = np.ones((len(MODULI), 1), np.int64)

    def __call__(self, n: int) -> np.ndarray:
        while self.table.shape[1] < n:
            step = self.table[:, -1:] * BASES[:, None] % MODULI[:, None]
            self.table = np.concatenate([self.table, self.table * step % MODULI[:, None]], axis=1)
        return self.table[:, :n]


def _terms(ids: np.ndarray, depths: np.ndarray, powers: Powers) -> np.ndarray:
    """(id + 1) * BASE**depth mod p, per modulus and token."""
    table = powers(int(depths.max()) + 1 if len(depths) else 1)
    return (ids.astype(np.int64) + 1)[None, :] * table[:, depths] % MODULI[:, None]


def keys(hashes: np.ndarray, lengths: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """One int64 key row per trained pair: two 62-bit hash words, context length, target."""
    return np.stack(
        [hashes[0] << 31 | hashes[1], hashes[2] << 31 | hashes[3], lengths, targets], axis=1
    ).astype(np.int64)


def sample_keys(ids: np.ndarray, start: int, powers: Powers) -> np.ndarray:
    """Keys of a sample's trained tokens k >= start, each with the context ids[:k]."""
    prefix = np.zeros((len(MODULI), len(ids) + 1), np.int64)
    np.cumsum(_terms(ids, np.arange(len(ids)), powers), axis=1, out=prefix[:, 1:])
    at = np.arange(start, len(ids))
    return keys(prefix[:, at] % MODULI[:, None], at, ids[at])


def row_keys(row: ShardRow, powers: Powers) -> tuple[np.ndarray, np.ndarray]:
    """Keys of a row's labelled tokens (context = the path to the token before), and the
    labelled token indices. Needs a checked row: positions are tree depths."""
    cumulative = np.cumsum(_terms(row.input_ids, row.position_ids, powers), axis=1)
    path = np.empty_like(cumulative)  # hash of the root-to-token path, per token
    ends = row.seg_starts + row.seg_lens
    for segment, (start, end) in enumerate(zip(row.seg_starts.tolist(), ends.tolist(), strict=True)):
        parent = int(row.seg_parents[segment])
        offset = np.zeros((len(MODULI), 1), np.int64)
        if parent >= 0:  # continue from the parent segment's last token
            offset += path[:, ends[parent] - 1 : ends[parent]]
        if start:
            offset -= cumulative[:, start - 1 : start]
        path[:, start:end] = (cumulative[:, start:end] + offset) % MODULI[:, None]
    labelled = np.flatnonzero(row.labels != IGNORE_INDEX)
    return keys(path[:, labelled - 1], row.position_ids[labelled], row.input_ids[labelled]), labelled
