"""What `onepass-prep inspect` prints for one row: a header, the segment tree with each
part's role and text, the attention mask drawn with block characters, or token detail."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from rich.cells import cell_len, set_cell_size
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from onepass_prep.format import IGNORE_INDEX
from onepass_prep.inspection.maskgrid import mask_grid
from onepass_prep.inspection.roles import (
    ROLE_COLOURS,
    ROLE_NAMES,
    Part,
    Role,
    marker_ids,
    parts,
    token_roles,
)
from onepass_prep.inspection.runs import ShardRow

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

STYLES = {role: "rgb({},{},{})".format(*colour) for role, colour in ROLE_COLOURS.items()}
SHADES = ((1.0, "█"), (2 / 3, "▓"), (1 / 3, "▒"), (0.0, "░"))
AXIS = 8  # characters left of the drawn mask (query token labels)


@dataclass
class RowView:
    """A row with its token roles and parts, and the tokenizer to show its text."""

    row: ShardRow
    roles: np.ndarray
    parts: list[Part]
    tokenizer: PreTrainedTokenizerBase

    @classmethod
    def build(cls, row: ShardRow, tokenizer) -> RowView:
        roles = token_roles(row, marker_ids(tokenizer))
        return cls(row, roles, parts(row, roles), tokenizer)

    def text(self, start: int, end: int) -> str:
        text = self.tokenizer.decode(self.row.input_ids[start:end].tolist())
        assert isinstance(text, str)  # one sequence of ids
        return text


def escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def snippet(text: str, limit: int) -> str:
    """The text escaped, cut in the middle to at most `limit` terminal cells (at least 20)."""
    text, limit = escape(text), max(20, limit)
    if cell_len(text) <= limit:
        return text
    tail = limit // 3
    return set_cell_size(text, limit - tail - 3) + " … " + set_cell_size(text[::-1], tail)[::-1]


def header(view: RowView, max_seq_len: int | None) -> Text:
    row = view.row
    trained = int((row.labels != IGNORE_INDEX).sum())
    out = Text()
    out.append(f"row {row.number}", style="bold")
    out.append(f"  ({row.file.name}, row {row.index})\n")
    out.append(f"{len(row):,} tokens, {trained:,} trained, {len(row.seg_lens)} segments, ")
    out.append(f"{len(row.trees)} trees, conversations: {', '.join(row.conversation_ids)}\n")
    if max_seq_len:
        out.append(
            f"no padding stored (FORMAT v1); padding to max_seq_len {max_seq_len:,} "
            f"would add {max(0, max_seq_len - len(row)):,} tokens\n",
            style="dim",
        )
    return out


def segment_tree(view: RowView, width: int) -> Tree:
    """Segments nested as in `seg_parents`, each with its parts in role colours; text
    snippets are cut to fit `width`."""
    row = view.row
    by_segment: dict[int, list[Part]] = {}
    for part in view.parts:
        by_segment.setdefault(part.segment, []).append(part)
    roots = np.flatnonzero(row.seg_parents < 0).tolist()
    owners = row.conversation_ids if len(roots) == len(row.conversation_ids) else None
    tree = Tree(Text(f"row {row.number}: segments (tokens and positions are inclusive)"))
    nodes: dict[int, Tree] = {}
    depths: dict[int, int] = {}
    for segment in range(len(row.seg_lens)):
        parent = int(row.seg_parents[segment])
        start = int(row.seg_starts[segment])
        end = start + int(row.seg_lens[segment])
        depth = 0 if parent < 0 else depths[parent] + 1
        depths[segment] = depth
        label = Text(f"seg {segment}", style="bold", no_wrap=True, overflow="ellipsis")
        if parent < 0 and owners:
            label.append(f"  {owners[roots.index(segment)]}", style="bold")
        label.append(
            f"  tokens {start}..{end - 1}  pos {row.position_ids[start]}..{row.position_ids[end - 1]}"
        )
        for part in by_segment[segment]:
            label.append("\n")
            place = f" {part.start}..{part.end - 1} ({part.end - part.start} tok)  "
            label.append(f"{ROLE_NAMES[part.role]:<17}", style=STYLES[part.role])
            label.append(place)
            room = width - 4 * (depth + 1) - 17 - len(place)
            label.append(snippet(view.text(part.start, part.end), room), style=STYLES[part.role])
        nodes[segment] = (tree if parent < 0 else nodes[parent]).add(label)
    return tree


def mask_text(view: RowView, width: int) -> Text:
    """The mask downsampled to the width: two characters per cell of b x b tokens, shaded
    by the share of visible pairs among those causality allows, coloured by key role."""
    row = view.row
    cells = max(1, min(len(row), (width - AXIS) // 2))
    grid = mask_grid(row, view.parts, cells)
    count = len(grid.edges) - 1
    fraction, role = grid.fraction, grid.role
    out = Text()
    out.append(f"attention mask: query ↓, key →, 1 cell = {grid.block}x{grid.block} tokens\n")
    ruler = [" "] * (AXIS + 2 * count)
    for column in range(0, count, 10):
        label = str(grid.edges[column])
        ruler[AXIS + 2 * column : AXIS + 2 * column + len(label)] = label
    out.append("".join(ruler).rstrip() + "\n", style="dim")
    for line in range(count):
        out.append(f"{grid.edges[line]:>{AXIS - 1}} ", style="dim")
        for column in range(line + 1):
            if grid.causal[line, column] == 0:
                out.append("  ")
            elif grid.visible[:, line, column].sum() == 0:
                out.append("· ", style="grey42")
            else:
                shade = next(char for low, char in SHADES if fraction[line, column] >= low)
                out.append(shade * 2, style=STYLES[Role(int(role[line, column]))])
        out.append("\n")
    out.append_text(legend())
    return out


def legend() -> Text:
    out = Text()
    for role in Role:
        out.append("██", style=STYLES[role])
        out.append(f" {ROLE_NAMES[role]}   ")
    out.append("\n· masked (causal but not visible)   blank: key after query\n")
    out.append("█ all, ▓ ≥ 2/3, ▒ ≥ 1/3, ░ some of a cell's causal pairs are visible\n")
    return out


def token_table(view: RowView, start: int, end: int) -> Table:
    """Token-level detail for tokens [start, end)."""
    row = view.row
    table = Table(title=f"row {row.number}, tokens {start}..{end - 1}")
    for name in ("token", "id", "text", "pos", "label", "seg", "parent seg", "role"):
        table.add_column(name, justify="right" if name in ("token", "id", "pos") else "left")
    for j in range(start, end):
        segment = int(row.segment_of[j])
        parent = int(row.seg_parents[segment])
        role = Role(int(view.roles[j]))
        table.add_row(
            str(j),
            str(row.input_ids[j]),
            Text(escape(view.text(j, j + 1)), style=STYLES[role]),
            str(row.position_ids[j]),
            "yes" if row.labels[j] != IGNORE_INDEX else "no",
            str(segment),
            "-" if parent < 0 else str(parent),
            ROLE_NAMES[role],
        )
    return table
