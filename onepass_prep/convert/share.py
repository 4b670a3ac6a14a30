"""Which conversations of a chunk share one tree (docs/FORMAT.md, "Shared prefixes").

Conversations are sorted by the tokens of their longest trained sample, so those that
share a prefix lie next to each other, and the common prefix of two conversations is the
smallest common prefix of the neighbours between them (an LCP array: O(tokens) after the
sort). A run of neighbours that each share at least `MIN_SHARED` tokens with the next
becomes one prefix tree, inserted in that order and cut into several trees (each
repeating the prefix) where it would pass `max_len`. Everything depends only on the
chunk's conversations, so every engine writes the same rows.

A conversation comes as its own layout: its samples are read back from it (a sample is
the root path to its last token), so a chunk holds one-pass tokens, not N-pass ones.
"""

from __future__ import annotations

import numpy as np

from onepass_prep.convert.loss import Normalization
from onepass_prep.convert.pack import Tree
from onepass_prep.convert.render import Sample, common_prefix_length
from onepass_prep.convert.tree import Layout, PrefixTree

# Conversations that share fewer tokens than this keep a tree each: measured in
# docs/benchmarks.md ("Sharing prefixes").
MIN_SHARED = 64


def shared_trees(
    conversations: list[tuple[str, Layout]], max_len: int, normalization: Normalization,
    min_shared: int = MIN_SHARED, merge_trained: bool = True,
) -> list[Tree]:
    """Trees for the conversations, ordered by their first conversation's input order; a
    conversation that shares too little with its neighbours keeps its own layout.
    `merge_trained` False branches before a trained token two conversations share instead
    of keeping it once (for the benchmark's comparison)."""
    paths = [_longest_sample(layout) for _, layout in conversations]
    keys = [path.astype(">u4").tobytes() for path in paths]  # bytes order = token order
    order = sorted(range(len(conversations)), key=lambda index: (keys[index], index))
    groups: list[list[int]] = []
    for previous, index in zip([-1, *order], order, strict=False):
        if groups and common_prefix_length(paths[previous], paths[index]) >= min_shared:
            groups[-1].append(index)
        else:
            groups.append([index])
    trees: list[tuple[int, Tree]] = []
    for group in groups:
        trees += _fitted(group, conversations, max_len, normalization, merge_trained)
    trees.sort(key=lambda tree: tree[0])
    return [tree for _, tree in trees]


def sample_tokens(layout: Layout, end: int) -> np.ndarray:
    """The tokens of the root path to token `end`: its segment up to it, then every
    ancestor segment whole (a child continues from its parent's last token)."""
    starts = np.cumsum(layout.seg_lens) - layout.seg_lens
    segment = int(np.searchsorted(starts, end, side="right")) - 1
    pieces = [layout.input_ids[starts[segment] : end + 1]]
    segment = int(layout.seg_parents[segment])
    while segment >= 0:
        pieces.append(layout.input_ids[starts[segment] : starts[segment] + layout.seg_lens[segment]])
        segment = int(layout.seg_parents[segment])
    return np.concatenate(pieces[::-1])


def samples_of(layout: Layout) -> list[Sample]:
    """A laid-out conversation's trained samples, as rendered."""
    return [
        Sample(sample_tokens(layout, int(end)), int(start), weight=float(weight))
        for end, start, weight in zip(layout.sample_ends, layout.sample_train_starts, layout.sample_weights, strict=True)
    ]


def _longest_sample(layout: Layout) -> np.ndarray:
    return sample_tokens(layout, int(layout.sample_ends[np.argmax(layout.position_ids[layout.sample_ends])]))


def _fitted(
    group: list[int], conversations: list[tuple[str, Layout]], max_len: int, normalization: Normalization,
    merge_trained: bool,
) -> list[tuple[int, Tree]]:
    """The group cut, in its order, into trees of at most `max_len` tokens (each
    conversation fits alone: work.py rejects those that do not), each with its first
    conversation's input index."""
    if len(group) == 1:
        return [(group[0], ([conversations[group[0]][0]], conversations[group[0]][1]))]
    trees: list[tuple[int, Tree]] = []
    members: list[int] = []
    tree = PrefixTree(merge_trained)
    for index in group:
        # Samples are read back when inserted (and again on a rebuild), so only the
        # current tree's samples are held, not the group's.
        tree.add(samples_of(conversations[index][1]), normalization)
        if tree.tokens > max_len and members:  # this one starts the next tree
            trees.append(_built(members, conversations, normalization, merge_trained))
            members, tree = [], PrefixTree(merge_trained)
            tree.add(samples_of(conversations[index][1]), normalization)
        members.append(index)
    trees.append(_built(members, conversations, normalization, merge_trained, tree))
    return trees


def _built(
    members: list[int], conversations: list[tuple[str, Layout]], normalization: Normalization,
    merge_trained: bool, tree: PrefixTree | None = None,
) -> tuple[int, Tree]:
    if len(members) == 1:
        return members[0], ([conversations[members[0]][0]], conversations[members[0]][1])
    if tree is None:
        tree = PrefixTree(merge_trained)
        for index in members:
            tree.add(samples_of(conversations[index][1]), normalization)
    layout = tree.layout()
    layout.unshared_tokens = sum(len(conversations[index][1]) for index in members)
    return min(members), ([conversations[index][0] for index in members], layout)
