"""`onepass-prep inspect` on real converted sample data: the segment tree and its roles,
the terminal mask, the PNG (pixels against the FORMAT.md rule), token detail, errors."""

import json
import time

import numpy as np
from helpers.paths import SAMPLE
from helpers.reference import READS, contract_messages, dense_mask
from helpers.runs import cli, converted, long_input, row_number, rows
from PIL import Image

from onepass_prep.convert.pack import join
from onepass_prep.convert.render import Sample
from onepass_prep.convert.tokenizer import load_tokenizer
from onepass_prep.convert.tree import layout_samples
from onepass_prep.inspection import picture
from onepass_prep.inspection.maskgrid import cell_edges, mask_grid
from onepass_prep.inspection.roles import ROLE_COLOURS, Role, marker_ids, parts, token_roles
from onepass_prep.inspection.runs import ShardRow, iter_rows, open_run, read_row

CHATS = {json.loads(line)["id"]: json.loads(line) for line in SAMPLE.read_text().splitlines()}
TEMPLATE_MESSAGES = {id: contract_messages(chat, READS[None]) for id, chat in CHATS.items()}


def no_pack():
    return converted("no-pack", "--no-pack")


def test_tree_shows_segments_roles_ranges_and_text():
    out = no_pack()
    result = cli("inspect", out, "--row", row_number(out, "tools-001"))
    assert result.exit_code == 0, result.output
    text = result.output
    assert "conversations: tools-001" in text
    assert "seg 0  tools-001  tokens 0..241  pos 0..241" in text
    assert "├── seg 1  tokens 242..415  pos 242..415" in text
    assert "└── seg 2  tokens 416..629  pos 242..455" in text  # positions restart: a sibling
    assert "trained           242..290 (49 tok)  <think>\\nThe user wants" in text
    assert "tool output       294..333 (40 tok)  <tool_response>\\n{\"city\": \"Paris\"" in text
    assert "answer-only copy  416..436 (21 tok)  <tool_call>\\n{\"name\": \"get_weather …" in text
    assert "answer-only copy  485..522 (38 tok)  It's currently **14" in text
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
    block = -(-length // 46)  # (100 columns - 8 for the axis) / 2 characters per cell
    assert f"1 cell = {block}x{block} tokens" in lines[top]
    grid = [line[8:] for line in lines[top + 2 : top + 2 + -(-length // block)]]
    assert grid[0].strip() == "██"  # token 0 sees itself
    assert all(len(line) == 2 * (i + 1) for i, line in enumerate(grid))  # lower triangle
    assert any("· " in line for line in grid)  # the masked sibling block
    assert "answer-only copy" in result.output and "masked (causal but not visible)" in result.output


def test_a_31k_token_row_is_drawn_by_blocks_quickly():
    out = converted("long", source=long_input())
    assert len(rows(out)) == 1 and rows(out)[0]["num_tokens"] > 30000
    started = time.perf_counter()
    result = cli("inspect", out, columns=100)
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("attention mask"))
    assert "1 cell = 683x683 tokens" in lines[top]
    grid = lines[top + 2 : top + 2 + 46]
    assert grid[-1].lstrip().startswith("30735")
    assert grid[-1][8:].startswith("· ")  # the last conversation cannot see the first
    assert elapsed < 20, elapsed


def test_png_pixels_follow_the_format_rule(tmp_path, qwen):
    out = no_pack()
    number = row_number(out, "sharegpt-001")  # two turns in 232 tokens: 4 pixels per token
    png = tmp_path / "mask.png"
    result = cli("inspect", out, "--row", number, "--png", png)
    assert result.exit_code == 0, result.output
    row = read_row(open_run(out), number)
    cells, scale = picture.cell_layout(len(row))
    assert cells == len(row) and scale >= 3
    image = np.asarray(Image.open(png).convert("RGB"))
    side = len(row) * scale
    assert image.shape[1] >= picture.LEFT + side and image.shape[0] >= picture.TOP + side + 160
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
    result = cli("inspect", converted("long", source=long_input()), "--png", png)
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(png).convert("RGB"))
    side = len(cell_edges(rows(converted("long", source=long_input()))[0]["num_tokens"], picture.GRID_PX)) - 1
    corner = image[picture.TOP + side - 2, picture.LEFT + 1]  # last queries, first keys
    assert tuple(corner) == picture.MASKED
    assert tuple(image[picture.TOP + 1, picture.LEFT + side - 2]) == picture.FUTURE
    assert tuple(image[picture.TOP, picture.LEFT]) == ROLE_COLOURS[Role.CONTEXT]


def test_token_detail():
    out = no_pack()
    result = cli("inspect", out, "--row", row_number(out, "tools-001"), "--tokens", "240:244", columns=120)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    head = next(line for line in lines if line.startswith("┃"))
    assert [cell.strip() for cell in head.split("┃")[1:-1]] == [
        "token", "id", "text", "pos", "label", "seg", "parent seg", "role"]
    body = [line.split("│")[1:-1] for line in lines if line.startswith("│")]
    cells = {int(cells[0]): [c.strip() for c in cells] for cells in body}
    assert sorted(cells) == [240, 241, 242, 243]
    assert cells[241] == ["241", "198", "\\n", "241", "no", "0", "-", "prompt/context"]
    assert cells[242] == ["242", "151667", "<think>", "242", "yes", "1", "0", "trained"]


def test_inspect_errors_name_the_problem(tmp_path):
    out = no_pack()
    assert cli("inspect", out, "--row", 36).exit_code == 1
    assert "no row 36" in cli("inspect", out, "--row", 36).output
    assert cli("inspect", out, "--tokens", "5").exit_code == 2
    missing = cli("inspect", tmp_path)
    assert missing.exit_code == 1 and "no manifest.json" in missing.output
    shard = out / "part-00000.parquet"
    assert cli("inspect", shard, "--row", 1).exit_code == 0  # a shard of the run works too
