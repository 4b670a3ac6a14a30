"""Which conversations of a chunk share one tree (docs/FORMAT.md, "Shared prefixes").

Conversations are sorted by their longest trained sample's tokens, so those that share a
prefix lie next to each other and the common prefix of neighbours is the common prefix
of the run between them (an LCP array, O(tokens) after the sort). A run of neighbours that
each share at least `MIN_SHARED` tokens with the next becomes one prefix tree, cut into
several trees (each repeating the prefix) where it would pass `max_len`. Everything
depends only on the chunk's conversations, so every engine writes the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onepass_prep.convert.loss import Normalization
from onepass_prep.convert.pack import Tree
from onepass_prep.convert.render import Sample, common_prefix_length
from onepass_prep.convert.tree import Layout, PrefixTree

# Fewer shared tokens than this are not worth a tree: measured in docs/benchmarks.md
# ("Sharing prefixes").
MIN_SHARED = 64


@dataclass
class Shareable:
    id: str
    samples: list[Sample]
    alone: Layout  # the conversation laid out on its own


def shared_trees(
    conversations: list[Shareable], max_len: int, normalization: Normalization, min_shared: int = MIN_SHARED
) -> list[Tree]:
    """Trees for the conversations, in input order of each tree's first conversation;
    a conversation that shares too little with its neighbours keeps its own layout."""
    keys = [_path(c.samples).astype(">u4").tobytes() for c in conversations]
    order = sorted(range(len(conversations)), key=lambda index: (keys[index], index))
    groups: list[list[int]] = []
    for previous, index in zip([-1] + order, order, strict=False):
        if groups and _common(conversations[previous], conversations[index]) >= min_shared:
            groups[-1].append(index)
        else:
            groups.append([index])
    trees: list[tuple[int, Tree]] = []
    for group in groups:
        trees += _fitted(group, conversations, max_len, normalization)
    trees.sort(key=lambda tree: tree[0])
    return [tree for _, tree in trees]


def _path(samples: list[Sample]) -> np.ndarray:
    return max((s.input_ids for s in samples if s.is_trained), key=len)


def _common(a: Shareable, b: Shareable) -> int:
    return common_prefix_length(_path(a.samples), _path(b.samples))


def _fitted(
    group: list[int], conversations: list[Shareable], max_len: int, normalization: Normalization
) -> list[tuple[int, Tree]]:
    """The group cut, in its order, into trees of at most `max_len` tokens (each
    conversation fits alone: work.py rejects those that do not), each with its first
    conversation's input index."""
    trees: list[tuple[int, Tree]] = []
    members: list[int] = []
    tree = PrefixTree(merge_trained=True)
    for index in group:
        tree.add(conversations[index].samples, normalization)
        if tree.tokens > max_len and members:  # this one starts the next tree
            trees.append(_built(members, conversations, normalization))
            members, tree = [], PrefixTree(merge_trained=True)
            tree.add(conversations[index].samples, normalization)
        members.append(index)
    trees.append(_built(members, conversations, normalization, tree))
    return trees


def _built(
    members: list[int], conversations: list[Shareable], normalization: Normalization, tree: PrefixTree | None = None
) -> tuple[int, Tree]:
    if len(members) == 1:
        only = conversations[members[0]]
        return members[0], ([only.id], only.alone)
    if tree is None:
        tree = PrefixTree(merge_trained=True)
        for index in members:
            tree.add(conversations[index].samples, normalization)
    layout = tree.layout()
    layout.unshared_tokens = sum(len(conversations[index].alone) for index in members)
    return min(members), ([conversations[index].id for index in members], layout)
