"""`onepass-prep inspect` on real converted sample data: the segment tree and its roles,
the terminal mask, the PNG (pixels against the FORMAT.md rule), token detail, errors."""

import json
import time

import numpy as np
from helpers.paths import SAMPLE
from helpers.reference import READS, contract_messages, dense_mask, reference_tokenizer
from helpers.runs import cli, converted, long_input, row_number, rows
from PIL import Image

from onepass_prep.convert.pack import join
from onepass_prep.convert.render import Sample
from onepass_prep.convert.tokenizer import load_tokenizer
from onepass_prep.convert.tree import layout_samples
from onepass_prep.inspection import picture
from onepass_prep.inspection.maskgrid import mask_grid
from onepass_prep.inspection.roles import ROLE_COLOURS, Role, marker_ids, parts, token_roles
from onepass_prep.inspection.runs import ShardRow, iter_rows, open_run, read_row

CHATS = {json.loads(line)["id"]: json.loads(line) for line in SAMPLE.read_text().splitlines()}
TEMPLATE_MESSAGES = {id: contract_messages(chat, READS[None]) for id, chat in CHATS.items()}


# docs/inspect.md: at a width of 100 columns, cells = (width - 8) / 2 and b = ceil(L / cells).
TERMINAL_CELLS = (100 - 8) // 2


def png_layout(length: int) -> tuple[int, int, int]:
    """(block b in tokens, cells per side, pixels per cell) of the PNG by docs/inspect.md:
    up to 1000 tokens one cell per token at round(1000 / L) pixels (at least 1); longer rows
    in blocks of b = ceil(L / 1000) tokens, as in the terminal."""
    block = -(-length // 1000)
    return block, -(-length // block), max(1, round(1000 / min(length, 1000)))


def no_pack():
    return converted("no-pack", "--no-pack")


def true_runs(flags) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(flags, np.int8), [0]])))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def segments(row: dict) -> list[tuple[int, int]]:
    """[start, end) of each segment, from the row's mask_spec as Parquet stores it."""
    ends = np.cumsum(row["mask_spec"]["seg_lens"]).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def longest_tail_in(ids: list[int], run: tuple[int, int], where: range) -> tuple[int, int]:
    """The longest end of the trained run `run` that `ids` repeats inside `where` (the
    docs/inspect.md 'answer-only copy': an unlabelled path equal to the end of a trained run)."""
    tail = ids[run[0] : run[1]]
    best = (where.start, where.start)
    for start in where:
        for k in range(min(len(tail), where.stop - start), best[1] - best[0], -1):
            if ids[start : start + k] == tail[len(tail) - k :]:
                best = (start, start + k)
                break
    return best


def test_tree_shows_segments_roles_ranges_and_text():
    out = no_pack()
    number = row_number(out, "tools-001")
    result = cli("inspect", out, "--row", number)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "1 conversation: tools-001" in text
    # Every expected range below comes from the Parquet row, not from inspect.
    row = rows(out)[number]
    assert row["mask_spec"]["seg_parents"] == [-1, 0, 0]  # a root with two branches
    positions, ids, labels = row["position_ids"], row["input_ids"], np.asarray(row["labels"])
    (a0, b0), (a1, b1), (a2, b2) = segments(row)

    def ranges(a, b):
        return f"tokens {a}..{b - 1}  pos {positions[a]}..{positions[b - 1]}"

    assert f"seg 0  tools-001  {ranges(a0, b0)}" in text
    assert f"├── seg 1  {ranges(a1, b1)}" in text
    assert f"└── seg 2  {ranges(a2, b2)}" in text
    assert positions[a2] == positions[a1]  # positions restart: a sibling

    def part(role, a, b):
        return f"{role:<17} {a}..{b - 1} ({b - a} tok)  "

    trained = true_runs(labels != -100)
    assert len(trained) == 3 and a1 == trained[0][0]
    assert part("trained", *trained[0]) + "<think>\\nThe user wants" in text
    # Tool output: from the <tool_response> token to </tool_response>, by token id.
    tokenizer = reference_tokenizer()
    opens = [j for j in range(a1, b1) if ids[j] == tokenizer.convert_tokens_to_ids("<tool_response>")]
    closes = [j for j in range(a1, b1) if ids[j] == tokenizer.convert_tokens_to_ids("</tool_response>")]
    assert len(opens) == len(closes) == 1
    assert part("tool output", opens[0], closes[0] + 1) + "<tool_response>\\n{\"city\": \"Paris\"" in text
    # Answer-only copies in seg 2: the longest unlabelled ends of seg 1's trained runs.
    context = range(a2, trained[2][0])
    assert (labels[context.start : context.stop] == -100).all()
    first, second = (longest_tail_in(ids, run, context) for run in trained[:2])
    assert first[0] == a2 and first[1] - first[0] > 2 and second[1] - second[0] > 2
    assert part("answer-only copy", *first) + "<tool_call>\\n{\"name\": \"get_weather …" in text
    assert part("answer-only copy", *second) + "It's currently **14" in text
    assert max(len(line) for line in text.splitlines()) <= 100


def merged_texts(tokenizer, row, roles, role):
    """Decoded text of each maximal run of `role` along the row's segments' parts."""
    texts, previous = [], None
    for part in parts(row, roles):
        if part.role != role:
            previous = None
            continue
        text = tokenizer.decode(row.input_ids[part.start : part.end].tolist())
        if previous is not None and previous.end == part.start:
            texts[-1] += text
        else:
            texts.append(text)
        previous = part
    return texts


def test_roles_match_the_input_messages(qwen):
    """Copies are the earlier answers as later turns see them; tool output is each tool
    message as the template wraps it; trained tokens are exactly the labelled ones."""
    markers = marker_ids(qwen.tokenizer)
    for row in iter_rows(open_run(no_pack())):
        chat = CHATS[row.conversation_ids[0]]
        messages = TEMPLATE_MESSAGES[chat["id"]]  # reasoning split off the answers
        roles = token_roles(row, markers)
        assert ((roles == Role.TRAINED) == (row.labels != -100)).all()
        tool_texts = set(merged_texts(qwen.tokenizer, row, roles, Role.TOOL))
        expected_tools = {f"<tool_response>\n{m['content']}\n</tool_response>" for m in messages if m["role"] == "tool"}
        assert tool_texts == expected_tools, chat["id"]
        if "tools" in chat:
            continue  # tool calls render differently from content: see the next test
        copies = set(merged_texts(qwen.tokenizer, row, roles, Role.COPY))
        answers = [m["content"] for m in messages if m["role"] == "assistant"][:-1]
        assert copies == {f"{answer}<|im_end|>\n" for answer in answers}, chat["id"]


def test_tool_call_answer_copies():
    view_row = read_row(open_run(no_pack()), row_number(no_pack(), "tools-001"))
    tokenizer = load_tokenizer("qwen").tokenizer
    roles = token_roles(view_row, marker_ids(tokenizer))
    assert merged_texts(tokenizer, view_row, roles, Role.COPY) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
        CHATS["tools-001"]["messages"][3]["content"] + "<|im_end|>\n",
    ]


def test_branch_point_copy_role():
    """Two trained branches leaving one token: the layout repeats it (tests/test_tree.py)."""
    layout = layout_samples(
        [Sample(np.asarray([1, 2, 3, 4], np.int32), 2), Sample(np.asarray([1, 2, 5, 6], np.int32), 2)]
    )
    packed = join([("c", layout)])
    row = ShardRow(
        file=None, index=0, number=0, input_ids=packed.input_ids, position_ids=packed.position_ids,
        labels=packed.labels, seg_lens=packed.seg_lens, seg_parents=packed.seg_parents,
        conversation_ids=["c"], num_tokens=len(packed), num_trained_tokens=4, n_pass_tokens=8,
        loss_weights=(packed.labels != -100).astype(np.float32), loss_units=4,
    )
    roles = token_roles(row, [])
    assert roles.tolist() == [Role.CONTEXT, Role.CONTEXT, Role.TRAINED, Role.TRAINED,
                              Role.BRANCH, Role.TRAINED, Role.TRAINED]


def test_mask_grid_counts_equal_the_dense_mask_summed_per_cell(qwen):
    markers = marker_ids(qwen.tokenizer)
    for row in list(iter_rows(open_run(no_pack())))[:6]:
        roles = token_roles(row, markers)
        dense = dense_mask(row.seg_lens, row.seg_parents)
        for cells in (len(row), 41):
            grid = mask_grid(row, parts(row, roles), cells)
            starts = grid.edges[:-1]
            for role in Role:
                expected = dense & (roles[None, :] == role)
                summed = np.add.reduceat(np.add.reduceat(expected.astype(np.int64), starts, 0), starts, 1)
                assert (grid.visible[role] == summed).all()
        assert grid.visible.sum() == (row.position_ids.astype(np.int64) + 1).sum()


def test_terminal_mask_of_a_short_row():
    out = no_pack()
    number = row_number(out, "sharegpt-001")  # two turns
    length = rows(out)[number]["num_tokens"]
    result = cli("inspect", out, "--row", number)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    top = lines.index(next(line for line in lines if line.startswith("attention mask")))
    block = -(-length // TERMINAL_CELLS)
    assert f"1 cell = {block}x{block} tokens" in lines[top]
    grid = [line[8:] for line in lines[top + 2 : top + 2 + -(-length // block)]]
    assert grid[0].strip() == "PP"  # token 0 (prompt) sees itself; no colour here: role letters
    assert all(len(line) == 2 * (i + 1) for i, line in enumerate(grid))  # lower triangle
    assert any("· " in line for line in grid)  # the masked sibling block
    assert "answer-only copy" in result.output and "masked (causal but not visible)" in result.output


def test_a_31k_token_row_is_drawn_by_blocks_quickly():
    out = converted("long", "--no-share-prefixes", source=long_input())
    assert len(rows(out)) == 1 and rows(out)[0]["num_tokens"] > 30000
    started = time.perf_counter()
    result = cli("inspect", out, columns=100)
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("attention mask"))
    length = rows(out)[0]["num_tokens"]
    block = -(-length // TERMINAL_CELLS)  # docs/inspect.md's rule, from the row's length
    count = -(-length // block)
    assert block > 1 and count <= TERMINAL_CELLS
    assert f"1 cell = {block}x{block} tokens" in lines[top]
    grid = lines[top + 2 : top + 2 + count]
    assert [int(line[:8]) for line in grid] == list(range(0, length, block))  # first query per cell row
    assert not lines[top + 2 + count][:8].strip().isdigit()  # and no more cell rows
    assert grid[-1][8:].startswith("· ")  # the last conversation cannot see the first
    assert elapsed < 20, elapsed


def test_png_pixels_follow_the_format_rule(tmp_path, qwen):
    out = no_pack()
    number = row_number(out, "sharegpt-001")  # two turns in 232 tokens
    png = tmp_path / "mask.png"
    result = cli("inspect", out, "--row", number, "--png", png)
    assert result.exit_code == 0, result.output
    row = read_row(open_run(out), number)
    length = rows(out)[number]["num_tokens"]
    block, cells, scale = png_layout(length)  # documented rule, not picture.cell_layout
    assert block == 1 and cells == length == len(row) and scale >= 3
    image = np.asarray(Image.open(png).convert("RGB"))
    side = cells * scale
    assert image.shape[1] >= picture.LEFT + side and image.shape[0] >= picture.TOP + side + 160
    # The mask is a square of that side: the diagonal reaches its last pixel, white beyond.
    assert tuple(image[picture.TOP + side - 1, picture.LEFT + side - 1]) != picture.FUTURE
    assert tuple(image[picture.TOP + side - 1, picture.LEFT + side]) == picture.FUTURE
    assert tuple(image[picture.TOP + side, picture.LEFT + side // 2]) == picture.FUTURE
    assert f"wrote {png} ({image.shape[1]}x{image.shape[0]})" in result.output.replace("\n", "")
    centre = np.arange(len(row)) * scale + scale // 2
    pixels = image[picture.TOP + centre][:, picture.LEFT + centre]  # [query, key, rgb]
    visible = dense_mask(row.seg_lens, row.seg_parents)
    roles = token_roles(row, marker_ids(qwen.tokenizer))
    role_rgb = np.array([ROLE_COLOURS[role] for role in Role])[roles]
    causal = np.tril(np.ones_like(visible))
    expected = np.where(visible[..., None], role_rgb[None, :, :], np.array(picture.MASKED))
    expected[~causal] = picture.FUTURE
    assert (pixels == expected).all()
    assert visible.any() and (~visible & causal).any()


def test_png_of_a_31k_token_row(tmp_path):
    png = tmp_path / "long.png"
    result = cli("inspect", converted("long", "--no-share-prefixes", source=long_input()), "--png", png)
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(png).convert("RGB"))
    assert f"({image.shape[1]}x{image.shape[0]})" in result.output.replace("\n", "")
    block, cells, scale = png_layout(rows(converted("long", "--no-share-prefixes", source=long_input()))[0]["num_tokens"])
    assert block > 1 and cells <= 1000 and scale == 1
    side = cells * scale
    assert tuple(image[picture.TOP + side - 1, picture.LEFT + side - 1]) != picture.FUTURE
    assert tuple(image[picture.TOP + side - 1, picture.LEFT + side]) == picture.FUTURE
    corner = image[picture.TOP + side - 2, picture.LEFT + 1]  # last queries, first keys
    assert tuple(corner) == picture.MASKED
    assert tuple(image[picture.TOP + 1, picture.LEFT + side - 2]) == picture.FUTURE
    assert tuple(image[picture.TOP, picture.LEFT]) == ROLE_COLOURS[Role.CONTEXT]


def test_token_detail():
    out = no_pack()
    number = row_number(out, "tools-001")
    row = rows(out)[number]
    first = row["mask_spec"]["seg_lens"][0]  # seg 1 starts here: show the two tokens either side
    result = cli("inspect", out, "--row", number, "--tokens", f"{first - 2}:{first + 2}", columns=120)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    head = next(line for line in lines if line.startswith("┃"))
    assert [cell.strip() for cell in head.split("┃")[1:-1]] == [
        "token", "id", "text", "pos", "label", "loss weight", "seg", "parent seg", "role"]
    body = [line.split("│")[1:-1] for line in lines if line.startswith("│")]
    cells = {int(cells[0]): [c.strip() for c in cells] for cells in body}
    assert sorted(cells) == list(range(first - 2, first + 2))
    tokenizer = reference_tokenizer()
    parents = row["mask_spec"]["seg_parents"]
    for j, segment, role in ((first - 1, 0, "prompt/context"), (first, 1, "trained")):
        labelled = row["labels"][j] != -100
        assert labelled == (role == "trained")  # docs/inspect.md: trained = labelled
        assert cells[j] == [
            str(j), str(row["input_ids"][j]), tokenizer.decode([row["input_ids"][j]]).replace("\n", "\\n"),
            str(row["position_ids"][j]), "yes" if labelled else "no",
            f"{row['loss_weights'][j]:.4g}" if labelled else "-", str(segment),
            "-" if parents[segment] == -1 else str(parents[segment]), role,
        ]


def test_inspect_errors_name_the_problem(tmp_path):
    out = no_pack()
    past = len(rows(out))  # one past the last row
    assert cli("inspect", out, "--row", past).exit_code == 1
    assert f"no row {past}" in cli("inspect", out, "--row", past).output
    assert cli("inspect", out, "--row", past - 1).exit_code == 0
    assert cli("inspect", out, "--tokens", "5").exit_code == 2
    missing = cli("inspect", tmp_path)
    assert missing.exit_code == 1 and "no manifest.json" in missing.output
    shard = out / "part-00000.parquet"
    assert cli("inspect", shard, "--row", 1).exit_code == 0  # a shard of the run works too
