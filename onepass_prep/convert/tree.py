"""Lay out the N-pass samples of a conversation (or of several that share a prefix,
share.py) as one tree.

The samples' token sequences form a prefix tree. Shared prefixes are kept once; every
trained token of every sample is labelled at a node whose root path is that sample's own
context: once per sample, or, when samples of different conversations are merged, once
for all samples that train it with that context, weighted by their summed loss weights. Nodes are runs of tokens (a compressed trie) and are matched
with array comparisons, so the cost is a handful of numpy calls per sample rather than
Python work per token.

Two rules keep the ordinary causal-LM shift right (token j is predicted from j - 1):
- a labelled run starts right after its parent in the row, so each node has at most one
  child whose first token is labelled, and that child is laid out first;
- where a second labelled branch must leave the same token, or (unless merging) a sample
  would label a token another sample already labels, the branch starts one token earlier
  with an unlabelled copy of the branch-point token, which no other sample reuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onepass_prep.convert.loss import Normalization, token_weights
from onepass_prep.convert.render import Sample
from onepass_prep.format import IGNORE_INDEX


@dataclass(eq=False)
class Node:
    sample: int  # a sample whose tokens [start, end) are this node's tokens
    start: int
    end: int
    labels: list[int] = field(default_factory=list)  # the samples this run trains, [] for context
    copy: bool = False  # a repeated branch-point token, private to one branch
    children: list[Node] = field(default_factory=list)
    labelled_child: Node | None = None  # the one child whose first token is trained


@dataclass
class Layout:
    """One tree per docs/FORMAT.md, before packing: one conversation, or several merged."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    labels: np.ndarray
    seg_lens: np.ndarray
    seg_parents: np.ndarray
    n_pass_tokens: int
    n_pass_pairs: int  # the causal (query, key) pairs of those samples: L(L+1)/2 each
    loss_weights: np.ndarray  # float32 per token, 0 where not trained (convert/loss.py)
    loss_units: int
    conversation_segments: list[np.ndarray]  # per conversation of the tree, the segments it uses
    unshared_tokens: int  # its conversations' tokens, were each laid out as a tree of its own
    # Per trained sample: the index of its last token in the row, its first trained
    # position and its message weight; with the tree, they give back every sample's tokens
    # (share.py rebuilds samples from them rather than holding N-pass tokens).
    sample_ends: np.ndarray  # int64
    sample_train_starts: np.ndarray  # int64
    sample_weights: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.input_ids)


class PrefixTree:
    """The samples of one or more conversations, inserted one after another. With
    `merge_trained`, a trained token that an earlier sample trains with the same context is
    kept once, trained for both (its loss weight is their sum); without, the later sample
    branches off before it with a copy of the branch point."""

    def __init__(self, merge_trained: bool = False):
        self.merge_trained = merge_trained
        self.samples: list[Sample] = []
        self.weights: list[float] = []  # per sample, the loss weight of each trained token
        self.conversation: list[int] = []  # per sample, its conversation (in the order added)
        self.conversations = 0
        self.units = 0
        self.root = Node(sample=-1, start=0, end=0)
        self.tokens = 0  # the layout's length so far
        self.ends: dict[int, Node] = {}  # trained sample -> the node holding its last token

    def add(self, samples: list[Sample], normalization: Normalization) -> None:
        """One conversation's samples, weighted per docs/FORMAT.md "Loss"."""
        weights, units = token_weights(
            [s.weight if s.is_trained else 0.0 for s in samples], [s.num_trained for s in samples], normalization
        )
        for sample, weight in zip(samples, weights, strict=True):
            self.samples.append(sample)
            self.weights.append(weight)
            self.conversation.append(self.conversations)
            if sample.is_trained:
                self._insert(len(self.samples) - 1)
        self.conversations += 1
        self.units += units

    def _tokens(self, node: Node) -> np.ndarray:
        return self.samples[node.sample].input_ids

    def _first_token(self, node: Node) -> int:
        return int(self._tokens(node)[node.start])

    def _split(self, parent: Node, node: Node, depth: int) -> Node:
        """Cut `node` at `depth` (start < depth < end); return the new upper half, which
        takes its place under `parent` (`node` keeps the lower half, so a sample's end
        node stays the node holding its last token)."""
        upper = Node(node.sample, node.start, depth, list(node.labels), False, [node])
        upper.labelled_child = node if node.labels else None
        node.start = depth
        place = next(i for i, child in enumerate(parent.children) if child is node)
        parent.children[place] = upper
        if parent.labelled_child is node:
            parent.labelled_child = upper
        return upper

    def _cut(self, path: list[Node], depth: int) -> Node:
        """Make a node boundary at `depth` along `path`; return the node ending there."""
        if depth == 0:
            return self.root
        for position, node in enumerate(path):
            if node.end == depth:
                return node
            if node.start < depth < node.end:
                upper = self._split(path[position - 1] if position else self.root, node, depth)
                path.insert(position, upper)
                return upper
        raise AssertionError(f"depth {depth} is not on the path")

    def _insert(self, index: int) -> None:
        tokens = self.samples[index].input_ids
        train_start, length = self.samples[index].train_start, len(tokens)
        path: list[Node] = []
        node, depth = self.root, 0
        while depth < length:
            child = next(
                (c for c in node.children if not c.copy and self._first_token(c) == tokens[depth]),
                None,
            )
            if child is None:
                break
            if depth >= train_start and (
                (child.labels and not self.merge_trained) or node.labelled_child not in (None, child)
            ):
                break  # labelling this child would clash with another sample's labels
            limit = min(child.end, length)
            theirs = self._tokens(child)[depth:limit]
            differ = np.flatnonzero(theirs != tokens[depth:limit])
            shared_end = depth + int(differ[0]) if differ.size else limit
            if child.labels and not self.merge_trained:
                shared_end = min(shared_end, max(depth, train_start))
            path.append(child)
            if shared_end < child.end:
                depth = shared_end
                break
            node, depth = child, child.end
        shared = depth
        if train_start < shared:  # label the shared tokens this sample trains
            self._cut(path, train_start)
            self._cut(path, shared)
            parent = self.root
            for node in path:
                if node.end > shared:
                    break
                if node.start >= train_start:
                    node.labels.append(index)
                    parent.labelled_child = node
                parent = node
        if shared == length:
            self.ends[index] = self._cut(path, shared)
            return
        attach = self._cut(path, shared)
        if shared >= train_start and attach.labelled_child is not None:
            # A copy of the branch-point token gives this branch a parent of its own.
            attach = self._cut(path, shared - 1)
            copy = Node(index, shared - 1, shared, copy=True)
            attach.children.append(copy)
            self.tokens += 1
            attach = copy
        self._add_branch(attach, index, shared, train_start, length)

    def _add_branch(self, attach: Node, index: int, start: int, train_start: int, end: int) -> None:
        self.tokens += end - start
        if start < train_start:
            context = Node(index, start, train_start)
            attach.children.append(context)
            attach, start = context, train_start
        trained = Node(index, start, end, labels=[index])
        attach.children.append(trained)
        attach.labelled_child = trained
        self.ends[index] = trained

    def layout(self) -> Layout:
        empty = np.zeros(0, np.int32)
        ids, positions, labels = [empty], [empty], [empty]
        weights = [np.zeros(0, np.float32)]
        seg_lens: list[int] = []
        seg_parents: list[int] = []
        segment_of: dict[int, int] = {}  # id(node) -> its segment
        row_index: dict[int, int] = {}  # id(node) -> the index of its first token in the row
        length = 0
        # Depth-first pre-order; the labelled child goes first so it follows its parent.
        stack: list[tuple[Node, int]] = [
            (child, -1) for child in reversed(self._ordered_children(self.root))
        ]
        while stack:
            node, parent_segment = stack.pop()
            segment = len(seg_lens)
            seg_lens.append(0)
            seg_parents.append(parent_segment)
            while True:
                segment_of[id(node)] = segment
                row_index[id(node)] = length
                length += node.end - node.start
                tokens = self._tokens(node)[node.start : node.end]
                ids.append(tokens)
                positions.append(np.arange(node.start, node.end, dtype=np.int32))
                labels.append(tokens if node.labels else np.full(len(tokens), IGNORE_INDEX, np.int32))
                weight = sum(self.weights[label] for label in node.labels)
                weights.append(np.full(len(tokens), weight, np.float32))
                seg_lens[segment] += len(tokens)
                if len(node.children) != 1:
                    break
                node = node.children[0]  # a single child continues the same segment
            for child in reversed(self._ordered_children(node)):
                stack.append((child, segment))
        lengths = [len(sample.input_ids) for sample in self.samples if sample.is_trained]
        trained = sorted(self.ends)
        ends = [row_index[id(self.ends[s])] + self.ends[s].end - 1 - self.ends[s].start for s in trained]
        return Layout(
            np.concatenate(ids).astype(np.int32),
            np.concatenate(positions),
            np.concatenate(labels).astype(np.int32),
            np.asarray(seg_lens, dtype=np.int32),
            np.asarray(seg_parents, dtype=np.int32),
            sum(lengths),
            sum(length * (length + 1) // 2 for length in lengths),
            np.concatenate(weights),
            self.units,
            self._conversation_segments(segment_of, seg_parents),
            sum(seg_lens),  # share.py sets it for a tree of several conversations
            np.asarray(ends, np.int64),
            np.asarray([self.samples[s].train_start for s in trained], np.int64),
            np.asarray([self.samples[s].weight for s in trained], np.float64),
        )

    def _conversation_segments(self, segment_of: dict[int, int], seg_parents: list[int]) -> list[np.ndarray]:
        """Per conversation, the segments its samples' root paths pass through."""
        found: list[set[int]] = [set() for _ in range(self.conversations)]
        for sample, end in self.ends.items():
            owned = found[self.conversation[sample]]
            segment = segment_of[id(end)]
            while segment >= 0 and segment not in owned:
                owned.add(segment)
                segment = seg_parents[segment]
        return [np.asarray(sorted(owned), np.int32) for owned in found]

    @staticmethod
    def _ordered_children(node: Node) -> list[Node]:
        first = node.labelled_child
        if first is None:
            return node.children
        return [first] + [child for child in node.children if child is not first]


def layout_samples(samples: list[Sample], normalization: Normalization = "token") -> Layout:
    """One conversation as one tree."""
    tree = PrefixTree()
    tree.add(samples, normalization)
    return tree.layout()
