"""What each token of a row is for, derived from the row alone (see docs/inspect.md).

Rows carry no role column: the roles shown by `inspect` are read off the structure (labels,
tree parents, siblings), the loss weights (with the manifest's normalization) and, for tool
output, the tokens of the template's tool markers.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from onepass_prep.format import IGNORE_INDEX, NORMALIZATIONS, FormatError
from onepass_prep.inspection.runs import ShardRow

# (open, close) texts around a tool result: Qwen2.5/Qwen3/Hermes, and ChatML's tool role.
TOOL_MARKERS = (("<tool_response>", "</tool_response>"), ("<|im_start|>tool", "<|im_end|>"))


class Role(IntEnum):
    CONTEXT = 0
    TRAINED = 1
    COPY = 2
    TOOL = 3
    BRANCH = 4
    DOWN = 5  # trained, message weight below 1
    UP = 6  # trained, message weight above 1


TRAINED_ROLES = (Role.TRAINED, Role.DOWN, Role.UP)
WEIGHT_DIGITS = 6  # significant digits a message weight is read to (the rows store float32)


ROLE_NAMES = {
    Role.CONTEXT: "prompt/context",
    Role.TRAINED: "trained",
    Role.COPY: "answer-only copy",
    Role.TOOL: "tool output",
    Role.BRANCH: "branch-point copy",
    Role.DOWN: "trained, w < 1",
    Role.UP: "trained, w > 1",
}
ROLE_LETTERS = {  # the mask's glyph of each role where the output has no colour
    Role.CONTEXT: "P",
    Role.TRAINED: "T",
    Role.COPY: "A",
    Role.TOOL: "O",
    Role.BRANCH: "B",
    Role.DOWN: "D",
    Role.UP: "U",
}
ROLE_COLOURS = {  # RGB; the terminal uses the same colours
    Role.CONTEXT: (66, 133, 244),
    Role.TRAINED: (52, 168, 83),
    Role.COPY: (251, 188, 5),
    Role.TOOL: (171, 71, 188),
    Role.BRANCH: (234, 67, 53),
    Role.DOWN: (0, 172, 193),
    Role.UP: (27, 94, 32),
}


@dataclass
class Part:
    """A maximal run of tokens with one role inside one segment."""

    segment: int
    start: int
    end: int
    role: Role


def run_weights(row: ShardRow, normalization: str = "token") -> np.ndarray:
    """The message weight of each trained run (one N-pass sample, see `ShardRow.trained_runs`),
    read back from `loss_weights` by undoing the normalization (docs/FORMAT.md, "Loss"):
    a trained token stores w under `token`, w / (the run's tokens) under `turn`, and
    w / (the trained tokens of its conversation's tree) under `conversation`. Rounded to
    WEIGHT_DIGITS significant digits, which the float32 weights hold."""
    if normalization not in NORMALIZATIONS:
        raise FormatError(
            f"{row.file.parent}: the manifest's loss normalization {normalization!r} is not one "
            f"of {', '.join(NORMALIZATIONS)}"
        )
    runs = np.asarray(row.trained_runs, np.int64).reshape(-1, 2)
    sums = np.concatenate(([0.0], np.cumsum(row.loss_weights, dtype=np.float64)))
    tokens = (runs[:, 1] - runs[:, 0]).astype(np.float64)
    weights = (sums[runs[:, 1]] - sums[runs[:, 0]]) / np.maximum(tokens, 1)  # the stored mean
    if normalization == "turn":
        weights = weights * tokens
    elif normalization == "conversation":
        labelled = np.concatenate(([0], np.cumsum(row.labels != IGNORE_INDEX)))
        tree_starts = np.asarray([start for start, _ in row.trees], np.int64)
        tree_ends = np.asarray([end for _, end in row.trees], np.int64)
        tree = np.searchsorted(tree_starts, runs[:, 0], side="right") - 1
        weights = weights * (labelled[tree_ends[tree]] - labelled[tree_starts[tree]])
    return np.asarray([float(f"{w:.{WEIGHT_DIGITS}g}") for w in weights.tolist()], np.float64)


def weight_text(weight: float) -> str:
    """A message weight as `inspect` and `stats` print it: up to 4 significant digits."""
    return f"{weight:.4g}"


def token_roles(
    row: ShardRow, tool_markers: list[tuple[list[int], list[int]]], normalization: str = "token"
) -> np.ndarray:
    """Role per token; `tool_markers` are the marker texts' token ids (see `marker_ids`),
    `normalization` the manifest's (to tell trained turns of weight 1 from the others)."""
    roles = np.full(len(row), Role.CONTEXT, np.int8)
    for (start, end), weight in zip(row.trained_runs, run_weights(row, normalization).tolist(), strict=True):
        roles[start:end] = Role.TRAINED if weight == 1 else Role.DOWN if weight < 1 else Role.UP
    _mark_branch_copies(row, roles)
    for start, end in row.trees:
        _mark_answer_copies(row, roles, start, end)
    _mark_tool_output(row, roles, tool_markers)
    return roles


def marker_ids(tokenizer) -> list[tuple[list[int], list[int]]]:
    """TOOL_MARKERS as token ids, for `token_roles`."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    return [(encode(open_), encode(close)) for open_, close in TOOL_MARKERS]


def parts(row: ShardRow, roles: np.ndarray) -> list[Part]:
    """Cut each segment into runs of one role, in row order."""
    cuts = np.zeros(len(row) + 1, bool)
    cuts[0] = cuts[-1] = True
    cuts[row.seg_starts] = True
    cuts[1:-1] |= roles[1:] != roles[:-1]
    edges = np.flatnonzero(cuts).tolist()
    return [
        Part(int(row.segment_of[a]), a, b, Role(int(roles[a])))
        for a, b in zip(edges, edges[1:], strict=False)
    ]


def _mark_branch_copies(row: ShardRow, roles: np.ndarray) -> None:
    """An unlabelled segment start repeating an earlier sibling's first token is the layout's
    private copy of a branch point (FORMAT.md: two trained branches leave one token). Roots
    are not compared: in a packed row they belong to different conversations."""
    seen: set[tuple[int, int]] = set()
    for segment, start in enumerate(row.seg_starts.tolist()):
        if row.seg_parents[segment] < 0:
            continue
        key = (int(row.seg_parents[segment]), int(row.input_ids[start]))
        if key in seen and roles[start] == Role.CONTEXT:
            roles[start] = Role.BRANCH
        seen.add(key)


def _mark_answer_copies(row: ShardRow, roles: np.ndarray, start: int, end: int) -> None:
    """Mark what later turns see of a response once the template has dropped its reasoning:
    an unlabelled path, off the trained run's own path, that starts after the same token as
    the run and equals the run's end, longer than the ending all trained runs of the tree
    share (e.g. `<|im_end|>\\n`)."""
    runs = [(a, b) for a, b in row.trained_runs if start <= a < end]
    if len(runs) < 2:
        return
    ids, parent = row.input_ids, row.parent_token
    shared = min(_common_suffix(ids[runs[0][0] : runs[0][1]], ids[a:b]) for a, b in runs[1:])
    for a, b in runs:
        if b - a <= shared:
            continue
        tail = ids[b - shared - 1 : b]
        node = np.flatnonzero((ids[start:end] == tail[-1]) & _unlabelled(roles[start:end]))
        node += start
        ok = np.ones(len(node), bool)
        ends = node.copy()
        for step in range(len(tail)):
            here = np.maximum(node, 0)
            ok &= (node >= 0) & (ids[here] == tail[-1 - step]) & _unlabelled(roles[here])
            node = np.where(node >= 0, parent[here], -1)
        for token in ends[ok].tolist():
            if not _sees(row, token, b - 1):  # a descendant of the run is no copy of it
                _mark_path(row, roles, token, a, b, shared)


def _unlabelled(roles: np.ndarray) -> np.ndarray:
    """Context, or already marked as a copy (copies of different runs share endings)."""
    return (roles == Role.CONTEXT) | (roles == Role.COPY)


def _sees(row: ShardRow, q: int, kv: int) -> bool:
    """Token q may attend to token kv (FORMAT.md): kv is q or one of its ancestors."""
    return kv <= q <= row.subtree_end[kv]


def _mark_path(row: ShardRow, roles: np.ndarray, token: int, a: int, b: int, shared: int) -> None:
    """Walk up from `token` while the path matches the trained run [a, b) backwards and is
    not the run's own context; mark it if it is long enough and starts where the run does."""
    ids, trained = row.input_ids, row.input_ids[a:b]
    path: list[int] = []
    while (
        token >= 0
        and len(path) < len(trained)
        and _unlabelled(roles[token])
        and ids[token] == trained[-1 - len(path)]
        and not _sees(row, a, token)
    ):
        path.append(token)
        token = int(row.parent_token[token])
    if len(path) > shared and token >= 0 and ids[token] == ids[a - 1]:
        roles[path] = Role.COPY


def _common_suffix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[len(a) - n :][::-1] != b[len(b) - n :][::-1])
    return int(differ[0]) if differ.size else n


def _mark_tool_output(row: ShardRow, roles: np.ndarray, markers) -> None:
    """Context tokens from a tool-result open marker to its close marker (or to the end of
    the context run holding it)."""
    ids = row.input_ids
    for open_ids, close_ids in markers:
        for first in _find(ids, open_ids).tolist():
            if roles[first] != Role.CONTEXT:
                continue
            stop = first + len(open_ids)
            while stop < len(ids) and roles[stop] == Role.CONTEXT and row.parent_token[stop] == stop - 1:
                if ids[stop : stop + len(close_ids)].tolist() == close_ids:
                    stop += len(close_ids)
                    break
                stop += 1
            span = roles[first:stop]
            span[span == Role.CONTEXT] = Role.TOOL


def _find(ids: np.ndarray, pattern: list[int]) -> np.ndarray:
    """Start indices of `pattern` in `ids`."""
    if not pattern or len(pattern) > len(ids):
        return np.zeros(0, np.int64)
    hits = np.ones(len(ids) - len(pattern) + 1, bool)
    for offset, token in enumerate(pattern):
        hits &= ids[offset : len(ids) - len(pattern) + 1 + offset] == token
    return np.flatnonzero(hits)
