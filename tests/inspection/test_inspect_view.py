"""`inspect`'s compact view on real converted sample data (docs/inspect.md): a packed row
fits the terminal, its conversations are listed once each with the ranges its mask_spec
gives, `--conversation ID` shows that conversation's tree and mask only, and the header
counts in the singular and the plural. Expected values come from the Parquet rows."""

import json
import re
from collections import Counter

import numpy as np
from helpers.reference import dense_mask
from helpers.runs import converted, row_number, rows
from PIL import Image
from rich.cells import cell_len
from typer.testing import CliRunner

from onepass_prep.cli import app
from onepass_prep.convert.tokenizer import load_tokenizer
from onepass_prep.inspection.roles import ROLE_NAMES, Role, marker_ids, token_roles
from onepass_prep.inspection.runs import iter_rows, open_run

runner = CliRunner()
# One list entry: id, tokens a..b, segments, trained tokens, turns (docs/inspect.md).
ENTRY = re.compile(r"(\S+)\s+(\d+)\.\.(\d+)\s+(\d+)\s+([\d,]+)\s+(\d+)(?=\s|$)")


def inspect(out, *args, columns: int = 100, lines: int | None = None):
    """The real command line in a terminal of `columns` x `lines` (None: LINES unset, as
    for output piped elsewhere: nothing is cut to a height)."""
    env = {"COLUMNS": str(columns), "LINES": None if lines is None else str(lines)}
    return runner.invoke(app, ["inspect", str(out), *map(str, args)], env=env)


def packed():
    return converted("packed")  # the sample in one row of 36 conversations


def expected_conversations(row: dict) -> dict[str, tuple[int, int, int, int, int]]:
    """Per conversation id: (first token, last token, segments, trained tokens, turns),
    from mask_spec and labels: a root segment and the segments up to the next root."""
    lens, parents = row["mask_spec"]["seg_lens"], row["mask_spec"]["seg_parents"]
    starts = np.concatenate([[0], np.cumsum(lens)])
    roots = [s for s, parent in enumerate(parents) if parent == -1]
    bounds = list(zip(roots, roots[1:] + [len(lens)], strict=True))
    labelled = np.asarray(row["labels"]) != -100
    expected = {}
    for name, (first, stop) in zip(row["conversation_ids"], bounds, strict=True):
        a, b = int(starts[first]), int(starts[stop])
        flags = np.concatenate([[0], labelled[a:b].astype(np.int8), [0]])
        turns = int((np.diff(flags) == 1).sum())  # maximal runs of labelled tokens
        expected[name] = (a, b - 1, stop - first, int(labelled[a:b].sum()), turns)
    return expected


def descendants(parents: list[int], root: int) -> set[int]:
    """`root` and every segment whose chain of parents reaches it."""
    out = set()
    for segment in range(len(parents)):
        walk = segment
        while walk != -1 and walk != root:
            walk = parents[walk]
        if walk == root:
            out.add(segment)
    return out


def listed(output: str) -> list[tuple]:
    return [
        (name, int(a), int(b), int(segs), int(trained.replace(",", "")), int(turns))
        for name, a, b, segs, trained, turns in ENTRY.findall(output)
    ]


def mask_lines(output: str) -> tuple[int, int, list[str], int]:
    """(index of the mask's title, block b, the cell rows, lines after them)."""
    lines = output.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("attention mask"))
    block = int(re.search(r"1 cell = (\d+)x\1 tokens", lines[top]).group(1))
    cells = []
    for line in lines[top + 2 :]:
        if not line[:8].strip().isdigit():
            break
        cells.append(line)
    return top, block, cells, len(lines) - (top + 2 + len(cells))


def test_a_packed_row_fits_the_terminal():
    """docs/inspect.md: cells = min((width - 8) / 2, the lines left below the header and
    the list, the mask's title, ruler and legend, and one for the shell's prompt)."""
    row = rows(packed())[0]
    assert len(row["conversation_ids"]) == 36
    length = row["num_tokens"]
    for columns, height in ((200, 50), (120, 30), (100, 40), (80, 24), (200, 80)):
        result = inspect(packed(), columns=columns, lines=height)
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert len(lines) <= height - 1, (columns, height, len(lines))
        assert max(cell_len(line) for line in lines) <= columns
        top, block, cells, after = mask_lines(result.output)
        by_height = height - 1 - top - 2 - after
        expected_cells = min((columns - 8) // 2, by_height)
        assert expected_cells >= 10  # the list gave way to the mask where it had to
        assert block == -(-length // expected_cells), (columns, height)
        assert len(cells) == -(-length // block)
        assert [int(line[:8]) for line in cells] == list(range(0, length, block))
        assert "masked (causal but not visible)" in lines[-2]  # the legend ends the output
    assert block < -(-length // ((200 - 8) // 2)) * 2  # a tall terminal gets a finer mask


def test_the_list_names_each_conversation_once_with_its_ranges():
    row = rows(packed())[0]
    expected = expected_conversations(row)
    for columns, height in ((200, 50), (100, None)):  # three columns; one, uncut
        result = inspect(packed(), columns=columns, lines=height)
        assert result.exit_code == 0, result.output
        entries = listed(result.output)
        assert {name: values for name, *values in entries} == {k: list(v) for k, v in expected.items()}
        assert len(entries) == len(expected)
        # Read down the columns: row order. Each id appears once in the whole output.
        assert [name for name, *_ in sorted(entries, key=lambda entry: entry[1])] == row["conversation_ids"]
        for name in expected:
            assert len(re.findall(rf"(?<![\w-]){re.escape(name)}(?![\w-])", result.output)) == 1, name
        assert "seg 0" not in result.output  # no segment tree for a packed row
    # Uncut (LINES unset): the mask follows the width alone, as before.
    _, block, _, _ = mask_lines(result.output)
    assert block == -(-row["num_tokens"] // ((100 - 8) // 2))


def test_a_short_terminal_cuts_the_list_and_says_how_many_more():
    row = rows(packed())[0]
    expected = expected_conversations(row)
    result = inspect(packed(), columns=120, lines=30)
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) <= 29
    shown = listed(result.output)
    assert shown and all(tuple(values) == expected[name] for name, *values in shown)
    by_start = [name for name, *_ in sorted(shown, key=lambda entry: entry[1])]
    assert by_start == row["conversation_ids"][: len(shown)]  # the row's first ones
    more = re.search(r"… and (\d+) more", result.output)
    assert more and int(more.group(1)) + len(shown) == len(expected)
    assert Counter(name for name, *_ in shown).most_common(1)[0][1] == 1


def test_conversation_shows_that_tree_and_its_mask_only():
    out = packed()
    row = rows(out)[0]
    name = "tools-001"  # a root with two branches: a masked block between them
    ids = row["conversation_ids"]
    assert 0 < ids.index(name) < len(ids) - 1  # inside the row, not at either end
    a, b, segs, trained, turns = expected_conversations(row)[name]
    parents = row["mask_spec"]["seg_parents"]
    root = [s for s, parent in enumerate(parents) if parent == -1][ids.index(name)]
    own = descendants(parents, root)
    assert len(own) == segs == 3
    result = inspect(out, "--conversation", name)
    assert result.exit_code == 0, result.output
    text = result.output
    assert {int(s) for s in re.findall(r"\bseg (\d+)\b", text)} == own
    assert len(re.findall(r"\bseg \d+\b", text)) == len(own)  # each once
    assert f"seg {root}  {name}  tokens {a}.." in text
    for other in ids:
        if other != name:
            assert other not in text, other
    assert listed(text) == [(name, a, b, segs, trained, turns)]
    ranges = re.findall(r"(?<!pos )(?<![\d.])(\d+)\.\.(\d+)", text)  # token ranges, not positions
    tokens = [int(token) for pair in ranges for token in pair]
    assert min(tokens) == a and max(tokens) == b  # every range shown lies in the conversation
    # Its mask: over tokens a..b only, by the width rule, against the FORMAT.md rule on
    # the conversation's own segments (parents renumbered from the root).
    top, block, cells, _ = mask_lines(text)
    assert f"tools-001 (tokens {a}..{b})" in text.splitlines()[top]
    length = b + 1 - a
    assert block == -(-length // ((100 - 8) // 2))
    assert [int(line[:8]) for line in cells] == list(range(a, b + 1, block))
    lens = row["mask_spec"]["seg_lens"][root : root + segs]
    sub_parents = [-1] + [parent - root for parent in parents[root + 1 : root + segs]]
    visible = dense_mask(lens, sub_parents)
    edges = list(range(0, length, block)) + [length]
    for i, line in enumerate(cells):
        drawn = line[8:]
        assert len(drawn) == 2 * (i + 1)
        for j in range(i + 1):
            any_visible = visible[edges[i] : edges[i + 1], edges[j] : edges[j + 1]].any()
            assert (drawn[2 * j : 2 * j + 2] != "· ") == any_visible, (i, j)
    assert "· " in "".join(cells)  # the second branch does not see the first's turn


def test_conversation_fits_the_terminal_too():
    result = inspect(packed(), "--conversation", "tools-001", columns=120, lines=40)
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) <= 39
    _, block, cells, _ = mask_lines(result.output)
    assert len(cells) >= 10


def test_unknown_conversation_is_one_line_naming_it_and_the_rows_ids():
    out = packed()
    result = inspect(out, "--conversation", "no-such-chat", "--row", 0)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "no conversation 'no-such-chat'" in errors[0]
    assert all(name in errors[0] for name in rows(out)[0]["conversation_ids"])
    assert "attention mask" not in result.output  # nothing drawn before the error
    assert inspect(out, "--conversation", "tools-001", "--tokens", "0:4").exit_code == 2


def test_header_counts_in_singular_and_plural():
    out = converted("no-pack", "--no-pack")
    number = row_number(out, "logic-001")
    row = rows(out)[number]
    assert len(row["mask_spec"]["seg_lens"]) == 1  # one turn: one segment
    result = inspect(out, "--row", number)
    assert result.exit_code == 0, result.output
    trained = sum(label != -100 for label in row["labels"])
    assert f"{row['num_tokens']} tokens, {trained} trained, 1 segment, 1 tree, 1 conversation: logic-001\n" in result.output
    assert "seg 0  logic-001  tokens 0.." in result.output  # one conversation: its whole tree
    assert "conversation  tokens" not in result.output  # and no list
    packed_row = rows(packed())[0]
    result = inspect(packed(), columns=200, lines=50)
    segments = len(packed_row["mask_spec"]["seg_lens"])
    assert f"{segments} segments, 36 trees, 36 conversations\n" in result.output
    assert re.search(r"\b1 (segments|trees|conversations)\b", result.output) is None


def test_png_and_tokens_are_unchanged_by_the_view(tmp_path):
    """--png draws the whole row, --conversation or not; --tokens gives its table."""
    out = packed()
    whole, one = tmp_path / "whole.png", tmp_path / "one.png"
    assert inspect(out, "--png", whole).exit_code == 0
    assert inspect(out, "--conversation", "tools-001", "--png", one).exit_code == 0
    assert (np.asarray(Image.open(whole)) == np.asarray(Image.open(one))).all()
    result = inspect(out, "--tokens", "0:3", columns=120)
    assert result.exit_code == 0, result.output
    assert "row 0, tokens 0..2" in result.output and "attention mask" not in result.output


def test_conversation_is_found_in_the_row_that_holds_it():
    """Without --row, --conversation looks through the run and the header says which row
    holds it; with a --row that does not hold it, the error says where it is; an id of a
    rejected record names the rejection."""
    out = converted("no-pack", "--no-pack")
    number = row_number(out, "tools-001")
    assert number > 0  # not the default row 0
    result = inspect(out, "--conversation", "tools-001")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"row {number}  (part-00000.parquet, row {number}), the row that holds tools-001\n")
    assert [entry[0] for entry in listed(result.output)] == ["tools-001"]
    result = inspect(out, "--conversation", "tools-001", "--row", 0)
    assert result.exit_code == 1
    assert "row 0 holds no conversation 'tools-001'" in result.output
    assert f"it is in row {number}" in result.output.replace("\n", " ")
    result = inspect(out, "--conversation", "no-such-chat")
    assert result.exit_code == 1 and "no row holds conversation 'no-such-chat'" in result.output
    assert "attention mask" not in result.output
    limited = converted("max-700", "--max-seq-len", "700")
    rejection = json.loads((limited / "rejected.jsonl").read_text().splitlines()[0])
    result = inspect(limited, "--conversation", rejection["id"], columns=400)
    assert result.exit_code == 1
    assert f"was rejected at {rejection['source']}:{rejection['line']} ({rejection['reason']})" in result.output


def role_of_letter(output: str) -> dict[str, str]:
    """The legend's role entries without colour: letter -> role name."""
    names = "|".join(re.escape(name) for name in ROLE_NAMES.values())
    return {letter: name for letter, name in re.findall(rf"(?:^|   )(\S) ({names})(?=   |$)", output, re.M)}


def test_without_colour_the_mask_and_legend_use_role_letters():
    """Output that is not a terminal has no colour: each role has a letter of its own in the
    legend, and each visible cell shows the letter of the key role with the most visible
    pairs (twice where every causal pair of the cell is visible, else with its shade),
    counted here from the FORMAT.md mask and the roles."""
    out = converted("no-pack", "--no-pack")
    number = row_number(out, "tools-001")
    result = inspect(out, "--row", number)
    assert result.exit_code == 0, result.output
    letters = role_of_letter(result.output)
    assert sorted(letters.values()) == sorted(ROLE_NAMES[role] for role in Role if role not in (Role.DOWN, Role.UP))
    assert "\x1b[" not in result.output
    row = next(r for r in iter_rows(open_run(out)) if r.number == number)
    roles = token_roles(row, marker_ids(load_tokenizer("qwen").tokenizer))
    visible = dense_mask(row.seg_lens, row.seg_parents)
    _, block, cells, _ = mask_lines(result.output)
    edges = list(range(0, len(row), block)) + [len(row)]
    causal = np.tril(np.ones((len(row), len(row)), bool))
    shades = {"▓": 2 / 3, "▒": 1 / 3, "░": 0}
    seen = set()
    for i, line in enumerate(cells):
        for j in range(i + 1):
            cell = line[8 + 2 * j : 10 + 2 * j]
            queries, keys = slice(edges[i], edges[i + 1]), slice(edges[j], edges[j + 1])
            seen_pairs = visible[queries, keys]
            if not seen_pairs.any():
                continue
            counts = [int(seen_pairs[:, roles[keys] == role].sum()) for role in Role]
            assert letters[cell[0]] == ROLE_NAMES[Role(int(np.argmax(counts)))], (i, j, cell)
            share = seen_pairs.sum() / causal[queries, keys].sum()
            assert cell[1] == cell[0] if share == 1 else share >= shades[cell[1]], (i, j, cell)
            seen.add(cell[0])
    assert {letters[letter] for letter in seen} >= {"prompt/context", "trained", "answer-only copy", "tool output"}


def test_in_a_terminal_the_legend_is_coloured_blocks():
    """FORCE_COLOR (a terminal, or `less -R`) keeps the coloured blocks."""
    out = converted("no-pack", "--no-pack")
    env = {"COLUMNS": "100", "LINES": None, "TERM": "xterm-256color", "FORCE_COLOR": "1", "NO_COLOR": None}
    result = runner.invoke(app, ["inspect", str(out)], env=env)
    assert result.exit_code == 0, result.output
    plain = re.sub(r"\x1b\[[0-9;]*m", "", result.output)
    assert plain != result.output and "██ prompt/context" in plain and "██ trained" in plain
    assert role_of_letter(plain) == {}
