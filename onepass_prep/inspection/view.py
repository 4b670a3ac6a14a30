"""What `onepass-prep inspect` prints for one row: a header, the row's conversations or
the segment tree with each part's role and text, the attention mask drawn with block
characters, or token detail. Every view fits the terminal's width; when the terminal's
height is known, the mask is sized to fit it too (see `layout`). Where the output shows
no colour (a pipe, a file, NO_COLOR), the mask's cells carry their role's letter."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from rich.cells import cell_len, set_cell_size
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from onepass_prep.format import IGNORE_INDEX
from onepass_prep.inspection.maskgrid import mask_grid
from onepass_prep.inspection.roles import (
    ROLE_COLOURS,
    ROLE_LETTERS,
    ROLE_NAMES,
    TRAINED_ROLES,
    Part,
    Role,
    marker_ids,
    parts,
    run_weights,
    token_roles,
    weight_text,
)
from onepass_prep.inspection.runs import Run, ShardRow, rows_holding

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

STYLES = {role: "rgb({},{},{})".format(*colour) for role, colour in ROLE_COLOURS.items()}
SHADES = ((1.0, "█"), (2 / 3, "▓"), (1 / 3, "▒"), (0.0, "░"))
SHADE_TEXTS = (" all", " ≥ 2/3", " ≥ 1/3", " some")
AXIS = 8  # characters left of the drawn mask (query token labels)
MASK_CHROME = 2  # lines of the drawn mask besides its cell rows and legend: title, ruler
MIN_CELLS = 10  # fewer cell rows than this beside the rest: the mask gets a screen of its own
GAP = "    "  # between the columns of the conversation list
WEIGHT_0_NOTE = "(weight-0 turns: prompt/context)"


class NoSuchConversation(LookupError):
    """`--conversation ID` names no conversation of the row."""


def conversation_row(run: Run, name: str) -> tuple[int, list[int]]:
    """The run-wide number of the first row (of the shards read) that holds conversation
    `name`, and any later ones (ids repeated in the input); NoSuchConversation saying why
    none does: rejected (with the reason), or not in the rows read."""
    holding = rows_holding(run, name)
    if holding:
        return holding[0], holding[1:]
    where = run.folder if run.whole else run.shards[0][0]
    for entry in run.rejected():
        if entry.get("id") == name:
            raise NoSuchConversation(
                f"{where}: conversation {name!r} was rejected at {entry.get('source')}:{entry.get('line')} "
                f"({entry.get('reason')})"
            )
    raise NoSuchConversation(f"{where}: no row holds conversation {name!r}")


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def weight_range(weights: list[float]) -> str:
    """The message weights of some trained turns: one value, `low–high`, or `-` for none."""
    if not weights:
        return "-"
    low, high = min(weights), max(weights)
    return weight_text(low) if low == high else f"{weight_text(low)}–{weight_text(high)}"


@dataclass
class RowView:
    """A row with its token roles and parts, the message weight of each trained run, the
    run's loss settings (the manifest's `loss`), and the tokenizer to show its text."""

    row: ShardRow
    roles: np.ndarray
    parts: list[Part]
    tokenizer: PreTrainedTokenizerBase
    weights: np.ndarray  # message weight per trained run (see roles.run_weights)
    loss: dict  # {"normalization": .., "train_on": ..}

    @classmethod
    def build(cls, row: ShardRow, tokenizer, loss: dict | None = None) -> RowView:
        loss = loss or {"normalization": "token", "train_on": "all"}
        roles = token_roles(row, marker_ids(tokenizer), loss["normalization"])
        return cls(row, roles, parts(row, roles), tokenizer, run_weights(row, loss["normalization"]), loss)

    @cached_property
    def token_weights(self) -> np.ndarray:
        """Per token, the message weight of its trained run; 0 where untrained."""
        out = np.zeros(len(self.row), np.float64)
        for (start, end), weight in zip(self.row.trained_runs, self.weights.tolist(), strict=True):
            out[start:end] = weight
        return out

    @property
    def weighted(self) -> bool:
        """Some trained turn of the row weighs other than 1."""
        return bool((self.weights != 1).any())

    def text(self, start: int, end: int) -> str:
        text = self.tokenizer.decode(self.row.input_ids[start:end].tolist())
        assert isinstance(text, str)  # one sequence of ids
        return text

    @cached_property
    def conversations(self) -> list[Conversation]:
        """The row's conversations in row order, each with its tree (named by
        `conversation_ids` when each id has its segments, as the converter writes them, else
        `tree K` per root). Conversations that share a tree each count the trained tokens
        and turns of their own segments (the shared ones included)."""
        row = self.row
        roots = np.flatnonzero(row.seg_parents < 0).tolist()
        ends = roots[1:] + [len(row.seg_lens)]
        owned = [segments.tolist() for segments in row.conversation_segments]
        names = row.conversation_ids
        if len(owned) != len(names) or any(not segments for segments in owned):
            names, owned = [f"tree {k}" for k in range(len(roots))], [list(range(a, b)) for a, b in zip(roots, ends, strict=True)]
        tree_of = np.searchsorted(roots, np.arange(len(row.seg_lens)), side="right") - 1
        labelled = np.concatenate(([0], np.cumsum(row.labels != IGNORE_INDEX)))
        run_segments = row.segment_of[[start for start, _ in row.trained_runs]] if row.trained_runs else np.zeros(0, int)
        out = []
        for name, segments in zip(names, owned, strict=True):
            tree = int(tree_of[segments[0]])
            start, end = row.trees[tree]
            ends_of = row.seg_starts[segments] + row.seg_lens[segments]
            trained = int((labelled[ends_of] - labelled[row.seg_starts[segments]]).sum())
            runs = np.flatnonzero(np.isin(run_segments, segments))
            weights = self.weights[runs].tolist()
            out.append(Conversation(name, range(roots[tree], ends[tree]), start, end, trained, len(runs), weights, segments))
        return out

    @cached_property
    def owners(self) -> dict[int, list[str]]:
        """Segment -> the conversations whose samples pass through it."""
        found: dict[int, list[str]] = {}
        for conversation in self.conversations:
            for segment in conversation.owned:
                found.setdefault(segment, []).append(conversation.id)
        return found

    def conversation(self, name: str) -> Conversation:
        for conversation in self.conversations:
            if conversation.id == name:
                return conversation
        names = ", ".join(conversation.id for conversation in self.conversations)
        raise NoSuchConversation(f"row {self.row.number} holds no conversation {name!r}; its conversations: {names}")


@dataclass
class Conversation:
    """One conversation of a row and its tree: the tree's root segment and descendants,
    tokens [start, end) (a tree several conversations share is each one's tree)."""

    id: str
    segments: range  # the root segment and its descendants (pre-order keeps them together)
    start: int
    end: int
    trained: int  # labelled tokens
    turns: int  # trained runs
    weights: list[float]  # the message weight of each trained run, in row order
    owned: list[int]  # its own segments: all of `segments`, unless it shares the tree


def escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def snippet(text: str, limit: int) -> str:
    """The text escaped, cut in the middle to at most `limit` terminal cells (at least 20)."""
    text, limit = escape(text), max(20, limit)
    if cell_len(text) <= limit:
        return text
    tail = limit // 3
    return set_cell_size(text, limit - tail - 3) + " … " + set_cell_size(text[::-1], tail)[::-1]


def header(view: RowView, max_seq_len: int | None, list_ids: bool = True, found: str | None = None) -> Text:
    """The row's place (and `found`: why this row, when `--conversation` found it), counts
    and conversations (their ids unless `list_ids` is false, for views that list them
    below), and the loss unless it is the plain one (token mean, train on all, every trained
    turn of weight 1)."""
    row = view.row
    trained = int((row.labels != IGNORE_INDEX).sum())
    ids = row.conversation_ids
    out = Text()
    out.append(f"row {row.number}", style="bold")
    out.append(f"  ({row.file.name}, row {row.index})")
    out.append(f", {found}\n" if found else "\n", style="bold")
    out.append(f"{plural(len(row), 'token')}, {trained:,} trained, {plural(len(row.seg_lens), 'segment')}, ")
    out.append(f"{plural(len(row.trees), 'tree')}, {plural(len(ids), 'conversation')}")
    out.append(f": {', '.join(ids)}\n" if list_ids and ids else "\n")
    loss = view.loss
    if view.weighted or (loss["normalization"], loss["train_on"]) != ("token", "all"):
        out.append(f"loss: {loss['normalization']} mean, train on {loss['train_on']}; ")
        out.append(weight_summary(view.weights.tolist()) + "\n")
    if max_seq_len:
        out.append(
            f"no padding stored; padding to max_seq_len {max_seq_len:,} "
            f"would add {max(0, max_seq_len - len(row)):,} tokens\n",
            style="dim",
        )
    return out


def owner_names(names: list[str], shown: int = 3) -> str:
    """The conversations of a segment: one id, or "shared by N: a, b, c, …"."""
    if len(names) == 1:
        return names[0]
    listed = ", ".join(names[:shown]) + (", …" if len(names) > shown else "")
    return f"shared by {len(names)}: {listed}"


def weight_summary(weights: list[float]) -> str:
    """How many trained turns weigh 1, less (down), more (up)."""
    if not weights:
        return "no trained turns"
    if all(weight == 1 for weight in weights):
        return f"{plural(len(weights), 'trained turn')}, all weight 1"
    below = sum(weight < 1 for weight in weights)
    above = sum(weight > 1 for weight in weights)
    counts = [f"{len(weights) - below - above:,} weight 1"] * (below + above < len(weights))
    counts += [f"{below:,} down"] * bool(below) + [f"{above:,} up"] * bool(above)
    return f"{plural(len(weights), 'trained turn')}: {', '.join(counts)}"


def segment_tree(view: RowView, width: int, conversation: Conversation | None = None) -> Tree:
    """Segments nested as in `seg_parents`, each with its parts in role colours (and, when
    a trained turn of the row weighs other than 1, each trained part with its turn's
    weight); text snippets are cut to fit `width`. All of the row's, or one conversation's."""
    row = view.row
    by_segment: dict[int, list[Part]] = {}
    for part in view.parts:
        by_segment.setdefault(part.segment, []).append(part)
    owners = view.owners
    title = f"row {row.number}"
    if conversation is not None:
        title += f", conversation {conversation.id}"
    tree = Tree(Text(f"{title}: segments (tokens and positions are inclusive)"))
    nodes: dict[int, Tree] = {}
    depths: dict[int, int] = {}
    shown = range(len(row.seg_lens)) if conversation is None else conversation.owned
    for segment in shown:
        parent = int(row.seg_parents[segment])
        start = int(row.seg_starts[segment])
        end = start + int(row.seg_lens[segment])
        depth = 0 if parent < 0 else depths[parent] + 1
        depths[segment] = depth
        label = Text(f"seg {segment}", style="bold", no_wrap=True, overflow="ellipsis")
        mine = owners.get(segment, [])
        if mine and (parent < 0 or mine != owners.get(parent)):  # a tree, or where a branch leaves
            label.append(f"  {owner_names(mine)}", style="bold")
        label.append(
            f"  tokens {start}..{end - 1}  pos {row.position_ids[start]}..{row.position_ids[end - 1]}"
        )
        for part in by_segment[segment]:
            label.append("\n")
            place = f" {part.start}..{part.end - 1} ({part.end - part.start} tok"
            if view.weighted and part.role in TRAINED_ROLES:
                place += f", weight {weight_text(view.token_weights[part.start])}"
            place += ")  "
            label.append(f"{ROLE_NAMES[part.role]:<17}", style=STYLES[part.role])
            label.append(place)
            room = width - 4 * (depth + 1) - 17 - len(place)
            label.append(snippet(view.text(part.start, part.end), room), style=STYLES[part.role])
        nodes[segment] = (tree if parent < 0 else nodes[parent]).add(label)
    return tree


def conversation_list(
    view: RowView, width: int, max_lines: int | None = None, only: list[Conversation] | None = None
) -> Text:
    """One line per conversation (`only`: those given, else all of the row's): id, token
    range (inclusive), segments, trained tokens, turns (trained runs), and when a trained
    turn of the row weighs other than 1, the weights of its turns. Side by side in columns,
    read down, as many as `width` holds; cut to `max_lines` with a last line saying how
    many more there are."""
    conversations = view.conversations if only is None else only
    heads: tuple[str, ...] = ("conversation", "tokens", "segs", "trained", "turns")
    cells: list[tuple[str, ...]] = [
        (c.id, f"{c.start}..{c.end - 1}", str(len(c.segments)), f"{c.trained:,}", str(c.turns))
        for c in conversations
    ]
    if view.weighted:
        heads += ("weight",)
        cells = [line + (weight_range(c.weights),) for line, c in zip(cells, conversations, strict=True)]
    sizes = [max([cell_len(head)] + [cell_len(line[k]) for line in cells]) for k, head in enumerate(heads)]
    rest = sum(sizes[1:]) + 2 * (len(sizes) - 1)
    sizes[0] = min(sizes[0], max(len(heads[0]), width - rest))  # a long id is cut, not wrapped
    entry = sizes[0] + 2 + rest
    columns = max(1, min(len(cells), (width + len(GAP)) // (entry + len(GAP))))
    lines = -(-len(cells) // columns)
    hidden = 0
    if max_lines is not None and lines + 1 > max_lines:
        lines = max(0, max_lines - 2)  # the heading, the lines, "… more"
        hidden = len(cells) - lines * columns
        cells = cells[: lines * columns]
    columns = max(1, -(-len(cells) // lines)) if lines else 1

    def field(k: int, value: str) -> str:
        if k == 0:
            return set_cell_size(value, sizes[0]) if cell_len(value) > sizes[0] else value.ljust(sizes[0])
        return value.ljust(sizes[k]) if k == 1 else value.rjust(sizes[k])

    out = Text()
    heading = "  ".join(field(k, head) for k, head in enumerate(heads))
    if lines:
        out.append(GAP.join([heading] * columns).rstrip() + "\n", style="dim")
    for line in range(lines):
        for column in range(columns):
            index = column * lines + line
            if index >= len(cells):
                break
            if column:
                out.append(GAP)
            values = cells[index]
            out.append(field(0, values[0]), style="bold")
            out.append("  " + "  ".join(field(k, value) for k, value in enumerate(values) if k))
        out.append("\n")
    if hidden:
        more = f"… and {hidden:,} more" if lines else "conversations"
        out.append(f"{more}: a taller terminal lists them all, --conversation ID shows one\n", style="dim")
    return out


def mask_text(
    view: RowView, width: int, max_cells: int | None = None, conversation: Conversation | None = None,
    colour: bool = True,
) -> Text:
    """The mask downsampled to the width (and to at most `max_cells` cell rows): two
    characters per cell of b x b tokens, shaded by the share of visible pairs among those
    causality allows, coloured by key role (without `colour`: the role's letter, then the
    shade). The whole row's, or one conversation's: its tokens see no other tree's, so its
    mask is the row's over its own token range."""
    row, parts, offset = view.row, view.parts, 0
    title = "attention mask"
    if conversation is not None:
        row, parts, offset = _sub_row(view, conversation), _sub_parts(view, conversation), conversation.start
        title += f" of {conversation.id} (tokens {conversation.start}..{conversation.end - 1})"
    cells = max(1, min(len(row), (width - AXIS) // 2, max_cells or len(row)))
    grid = mask_grid(row, parts, cells)
    count = len(grid.edges) - 1
    fraction, role = grid.fraction, grid.role
    out = Text()
    out.append(f"{title}: query ↓, key →, 1 cell = {grid.block}x{grid.block} tokens\n")
    ruler = [" "] * (AXIS + 2 * count)
    for column in range(0, count, 10):
        label = str(offset + grid.edges[column])
        ruler[AXIS + 2 * column : AXIS + 2 * column + len(label)] = label
    out.append("".join(ruler).rstrip() + "\n", style="dim")
    for line in range(count):
        out.append(f"{offset + grid.edges[line]:>{AXIS - 1}} ", style="dim")
        for column in range(line + 1):
            if grid.causal[line, column] == 0:
                out.append("  ")
            elif grid.visible[:, line, column].sum() == 0:
                out.append("· ", style="grey42")
            else:
                shade = next(char for low, char in SHADES if fraction[line, column] >= low)
                key = Role(int(role[line, column]))
                out.append(shade * 2 if colour else _plain_cell(key, shade), style=STYLES[key])
        out.append("\n")
    out.append_text(legend(view, conversation, width, colour))
    return out


def legend(
    view: RowView | None = None, conversation: Conversation | None = None, width: int | None = None,
    colour: bool = True,
) -> Text:
    """The mask's legend: the roles (those of weighted turns only where the row, or the
    conversation drawn, has them) by colour, or without `colour` by letter, entries kept
    whole on lines of `width`; and for a row with weights or a run that trains only last
    turns, where weight-0 turns are, if that takes no line more."""
    shown: set[int] = set()
    if view is not None:
        start, end = (0, len(view.row)) if conversation is None else (conversation.start, conversation.end)
        shown = set(np.unique(view.roles[start:end]).tolist())
    entries = [
        Text("██" if colour else ROLE_LETTERS[role], style=STYLES[role]) + Text(f" {ROLE_NAMES[role]}")
        for role in Role
        if role not in (Role.DOWN, Role.UP) or role in shown
    ]
    out = _entry_lines(entries, width)
    if view is not None and (view.weighted or view.loss["train_on"] == "last"):
        noted = _entry_lines([*entries, Text(WEIGHT_0_NOTE)], width)
        if width is None or count_lines(noted, width) == count_lines(out, width):
            out = noted
    out.append("\n· masked (causal but not visible)   blank: key after query\n")
    if colour:
        out.append("█ all, ▓ ≥ 2/3, ▒ ≥ 1/3, ░ some of a cell's causal pairs are visible")
    else:
        shaded = ", ".join(_plain_cell(Role.TRAINED, char) + text for (_, char), text in zip(SHADES, SHADE_TEXTS, strict=True))
        out.append(f"{shaded} of a cell's causal pairs are visible")
    return out


def _plain_cell(role: Role, shade: str) -> str:
    """A visible cell without colour: its role's letter twice where every causal pair is
    visible, else the letter and the shade."""
    letter = ROLE_LETTERS[role]
    return letter * 2 if shade == SHADES[0][1] else letter + shade


def _entry_lines(entries: list[Text], width: int | None) -> Text:
    """Legend entries three spaces apart, a new line where the next would pass `width`."""
    out, used = Text(), 0
    for entry in entries:
        if used and width is not None and used + 3 + entry.cell_len > width:
            out.append("\n")
            used = 0
        elif used:
            out.append("   ")
            used += 3
        out.append_text(entry)
        used += entry.cell_len
    return out


def _sub_row(view: RowView, conversation: Conversation) -> ShardRow:
    """The row cut to one conversation's tree: segments renumbered from its root, tokens
    from its first. Enough for `mask_grid`, which reads only lengths and the tree."""
    row, first = view.row, conversation.segments.start
    segments = slice(first, conversation.segments.stop)
    tokens = slice(conversation.start, conversation.end)
    parents = row.seg_parents[segments].copy()
    parents[parents >= 0] -= first
    return ShardRow(
        row.file, row.index, row.number, row.input_ids[tokens], row.position_ids[tokens],
        row.labels[tokens], row.seg_lens[segments], parents, [conversation.id],
        num_tokens=conversation.end - conversation.start, num_trained_tokens=conversation.trained,
        n_pass_tokens=0,  # not known per conversation, and not drawn
        loss_weights=row.loss_weights[tokens], loss_units=0,  # units: not known per conversation
    )


def _sub_parts(view: RowView, conversation: Conversation) -> list[Part]:
    first, start = conversation.segments.start, conversation.start
    return [
        Part(part.segment - first, part.start - start, part.end - start, part.role)
        for part in view.parts
        if part.segment in conversation.segments
    ]


def screen_height(console: Console) -> int | None:
    """The height to fit: LINES if set (`LINES=40 onepass-prep inspect ... | less`), else
    the terminal's when the output goes to one. Else None: nothing is cut. (Not rich's
    `is_terminal`, which FORCE_COLOR turns on for a pipe.)"""
    if os.environ.get("LINES", "").isdigit():
        return int(os.environ["LINES"])
    try:
        tty = console.file.isatty()
    except (AttributeError, ValueError):  # no such method, or closed
        tty = False
    return console.height if tty else None


def shows_colour(console: Console) -> bool:
    """Whether `console` prints colour: a terminal (or FORCE_COLOR) without NO_COLOR. Else
    the mask is drawn with role letters, which a file or a pager without colour keeps."""
    return console.color_system is not None and not console.no_color


def count_lines(renderable: RenderableType, width: int) -> int:
    """Lines `renderable` takes when printed at `width`."""
    console = Console(width=width, file=io.StringIO(), color_system=None)
    return len(console.render_lines(renderable, console.options, pad=False))


def mask_rows(
    height: int | None, above: int, width: int, view: RowView | None = None,
    conversation: Conversation | None = None, colour: bool = True,
) -> int | None:
    """Most cell rows for a mask printed below `above` lines, so that the output and the
    shell's next prompt fit `height` lines; when fewer than MIN_CELLS would fit, as many as
    fit a screen on their own (the lines above scroll away)."""
    if height is None:
        return None
    own = height - 1 - MASK_CHROME - count_lines(legend(view, conversation, width, colour), width)
    return max(1, own - above if own - above >= MIN_CELLS else own)


def layout(
    view: RowView, width: int, height: int | None, max_seq_len: int | None, conversation: str | None = None,
    colour: bool = True, found: str | None = None,
) -> list[RenderableType]:
    """What `inspect` prints without --tokens, in order (the mask by role colour, or
    without `colour` by role letter; `found`: see `header`).

    - a row of several conversations: the header, one line per conversation, the mask, all
      of it within `height` (the list is cut if need be, to leave MIN_CELLS cell rows);
    - a row of one conversation, or `conversation` (an id): the header, the whole segment
      tree of the row or of that conversation, then its mask, within `height` too if the
      tree leaves room for MIN_CELLS cell rows, else on a screen of its own.
    """
    if conversation is not None:
        chosen = view.conversation(conversation)  # NoSuchConversation before anything prints
        top: list[RenderableType] = [
            header(view, max_seq_len, list_ids=False, found=found),
            conversation_list(view, width, only=[chosen]),
            segment_tree(view, width, chosen),
        ]
        above = sum(count_lines(part, width) for part in top)
        cells = mask_rows(height, above, width, view, chosen, colour)
        return [*top, mask_text(view, width, cells, chosen, colour)]
    if len(view.conversations) <= 1:
        top = [header(view, max_seq_len), segment_tree(view, width)]
        above = sum(count_lines(part, width) for part in top)
        return [*top, mask_text(view, width, mask_rows(height, above, width, view, colour=colour), colour=colour)]
    head = header(view, max_seq_len, list_ids=False)
    listed = conversation_list(view, width)
    if height is not None:  # cut the list to leave MIN_CELLS cell rows
        legend_lines = count_lines(legend(view, width=width, colour=colour), width)
        room = height - 1 - count_lines(head, width) - MASK_CHROME - MIN_CELLS - legend_lines
        cut = max(1, room)  # fewer while the list (wrapped lines, blank line) is taller
        while cut > 0 and count_lines(listed, width) > room:
            listed = conversation_list(view, width, max_lines=cut)
            cut -= 1
    above = count_lines(head, width) + count_lines(listed, width)
    return [head, listed, mask_text(view, width, mask_rows(height, above, width, view, colour=colour), colour=colour)]


def token_table(view: RowView, start: int, end: int) -> Table:
    """Token-level detail for tokens [start, end)."""
    row = view.row
    table = Table(title=f"row {row.number}, tokens {start}..{end - 1}")
    for name in ("token", "id", "text", "pos", "label", "loss weight", "seg", "parent seg", "role"):
        table.add_column(name, justify="right" if name in ("token", "id", "pos", "loss weight") else "left")
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
            weight_text(float(row.loss_weights[j])) if row.labels[j] != IGNORE_INDEX else "-",
            str(segment),
            "-" if parent < 0 else str(parent),
            ROLE_NAMES[role],
        )
    return table
