"""`stats` and `inspect` show the loss weights (docs/inspect.md) of real converts of a
weighted copy of the sample chats, under each normalization and `--train-on last`.

Expected values come from the weights written into the input here and the N-pass samples
rendered without the converter (tests/helpers/reference.py), and from pyarrow reads of the
rows; never from the program's own output."""

import json
import re
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.paths import SAMPLE
from helpers.reference import source_samples
from helpers.runs import cli, converted, rows, runner
from PIL import Image
from rich.cells import cell_len

from onepass_prep.cli import app
from onepass_prep.format import SCHEMA_V1
from onepass_prep.inspection import picture
from onepass_prep.inspection.roles import ROLE_COLOURS, Role, token_roles
from onepass_prep.inspection.runs import iter_rows, open_run

# Assistant message j of record k gets CYCLE[(2k + j) % len(CYCLE)]: no field (weight 1),
# each spelling of a weight, weight 0 both ways, fractions below and above 1.
CYCLE = [{}, {"weight": 0.5}, {"train": False}, {"loss_weight": 2}, {"weight": 0},
         {"weight": 1 / 3}, {"train": True}, {"loss_weight": 0.25}, {"weight": 1.5}]
LAST_INSTEAD_OF_0 = {"weight": 0.75}  # a conversation's last turn always trains
# One list entry (docs/inspect.md): id, tokens a..b, segs, trained, turns, weight(s).
ENTRY = re.compile(r"(\S+)\s+(\d+)\.\.(\d+)\s+(\d+)\s+([\d,]+)\s+(\d+)\s+([\d.]+(?:–[\d.]+)?|-)(?=\s|$)")


def message_weight(fields: dict) -> float:
    if "train" in fields:
        return 1.0 if fields["train"] else 0.0
    return float(fields.get("weight", fields.get("loss_weight", 1.0)))


def assistant_messages(record: dict) -> list[dict]:
    if "conversations" in record:
        return [turn for turn in record["conversations"] if turn["from"] in ("gpt", "assistant")]
    return [message for message in record["messages"] if message["role"] == "assistant"]


@pytest.fixture(scope="module")
def weighted(tmp_path_factory):
    """(the weighted input, {conversation id: message weight of each assistant message})."""
    path = tmp_path_factory.mktemp("weighted") / "weighted.jsonl"
    lines, weights = [], {}
    for k, line in enumerate(SAMPLE.read_text(encoding="utf-8").splitlines()):
        record = json.loads(line)
        messages = assistant_messages(record)
        for j, message in enumerate(messages):
            fields = CYCLE[(2 * k + j) % len(CYCLE)]
            if j == len(messages) - 1 and message_weight(fields) == 0:
                fields = LAST_INSTEAD_OF_0
            message.update(fields)
        weights[str(record["id"])] = [message_weight(m) for m in messages]
        lines.append(json.dumps(record, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, weights


@pytest.fixture(scope="module")
def samples():
    """Per conversation, each assistant message's trained tokens, rendered by the reference
    (the weight fields change no rendering: they are taken out before the template)."""
    return {name: [len(ids) - start for ids, start in turns] for name, turns in source_samples(SAMPLE).items()}


def trained_turns(weights, samples, train_on: str) -> dict[str, list[tuple[float, int]]]:
    """Per conversation, (message weight, trained tokens) of each turn that trains."""
    out = {}
    for name, turns in weights.items():
        last = len(turns) - 1
        out[name] = [
            (weight, tokens)
            for j, (weight, tokens) in enumerate(zip(turns, samples[name], strict=True))
            if weight > 0 and tokens > 0 and (train_on == "all" or j == last)
        ]
    return out


def expected_loss(turns: dict[str, list[tuple[float, int]]], normalization: str) -> tuple[int, float]:
    """(loss units, sum of loss weights) by the FORMAT.md table."""
    units, total = 0, 0.0
    for conversation in turns.values():
        tokens = sum(n for _, n in conversation)
        if normalization == "token":
            units += tokens
            total += sum(w * n for w, n in conversation)
        elif normalization == "turn":
            units += len(conversation)
            total += sum(w for w, _ in conversation)
        else:
            units += bool(conversation)
            total += sum(w * n for w, n in conversation) / tokens if tokens else 0.0
    return units, total


def convert(weighted, normalization: str, train_on: str = "all", *extra: str):
    path, _ = weighted
    name = f"weighted-{normalization}-{train_on}" + "".join(extra)
    return converted(name, "--loss-normalization", normalization, "--train-on", train_on, *extra, source=path)


SETTINGS = [("token", "all"), ("turn", "all"), ("conversation", "all"), ("turn", "last")]


@pytest.mark.parametrize(("normalization", "train_on"), SETTINGS)
def test_stats_counts_the_turns_by_weight_and_the_loss_units(weighted, samples, normalization, train_on):
    out = convert(weighted, normalization, train_on)
    result = cli("stats", out, "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    turns = trained_turns(weighted[1], samples, train_on)
    assert stats["run"]["rejected"] == 0
    flat = [w for conversation in turns.values() for w, _ in conversation]
    assert 0 in [w for ws in weighted[1].values() for w in ws]  # weight-0 turns are in the input
    loss = stats["loss"]
    assert (loss["normalization"], loss["train_on"]) == (normalization, train_on)
    assert stats["trained_runs"] == len(flat)
    assert loss["trained_turns"] == {
        "weight_1": sum(w == 1 for w in flat),
        "below_1": sum(w < 1 for w in flat),
        "above_1": sum(w > 1 for w in flat),
    }
    assert loss["trained_turns"]["below_1"] and (train_on == "last" or loss["trained_turns"]["above_1"])
    expected = Counter(flat)
    listed = {entry["weight"]: entry["turns"] for entry in loss["turn_weights"]}
    assert loss["distinct_turn_weights"] == len(expected) == len(listed)
    assert sorted(listed) == pytest.approx(sorted(expected), rel=1e-5)
    assert [listed[w] for w in sorted(listed)] == [expected[w] for w in sorted(expected)]
    assert loss["turn_weight"]["min"] == pytest.approx(min(flat), rel=1e-5)
    assert loss["turn_weight"]["max"] == pytest.approx(max(flat), rel=1e-5)
    units, total = expected_loss(turns, normalization)
    assert loss["units"] == units
    assert loss["weight_sum"] == pytest.approx(total, rel=1e-5)
    assert loss["mean_weight_per_unit"] == pytest.approx(total / units, rel=1e-5)
    # The same sums off the Parquet columns.
    table = rows(out)
    assert units == sum(row["loss_units"] for row in table)
    assert total == pytest.approx(sum(sum(row["loss_weights"]) for row in table), rel=1e-5)


def test_stats_table_shows_the_loss(weighted, samples):
    out = convert(weighted, "conversation")
    result = cli("stats", out)
    assert result.exit_code == 0, result.output
    text = result.output
    flat = [w for turns in trained_turns(weighted[1], samples, "all").values() for w, _ in turns]

    def cells(label: str) -> list[str]:
        line = next(line for line in text.splitlines() if line.startswith(f"│ {label} "))
        return [cell.strip() for cell in line.split("│")[1:-1]]

    assert cells("loss: normalization / train on")[1] == "conversation / all"
    assert cells("trained turns of weight 1")[1] == f"{sum(w == 1 for w in flat):,}"
    assert cells("  weight < 1 (down)")[1] == f"{sum(w < 1 for w in flat):,}"
    assert cells("  weight > 1 (up)")[1] == f"{sum(w > 1 for w in flat):,}"
    assert cells("loss units (conversations)")[1] == f"{len(weighted[1]):,}"
    common = Counter(flat).most_common(1)[0]
    assert f"{common[0]:.4g} ×{common[1]:,}" in cells("turn weights")[1]
    assert max(cell_len(line) for line in text.splitlines()) <= 100


def test_stats_of_an_unweighted_and_a_v1_run_say_weight_1(weighted, tmp_path):
    """A v1 folder (no loss columns, no manifest `loss`) reads as token mean, weight 1."""
    out = converted("packed")
    v1 = tmp_path / "v1"
    v1.mkdir()
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["shards"]:
        table = pq.read_table(out / entry["file"])
        table = table.drop_columns(["loss_weights", "loss_units", "conversation_segments", "n_pass_pairs"]).cast(SCHEMA_V1)
        pq.write_table(table, v1 / entry["file"], compression="zstd")
    manifest["format_version"] = 1
    del manifest["loss"]
    (v1 / "manifest.json").write_text(json.dumps(manifest))
    trained = sum(row["num_trained_tokens"] for row in rows(out))
    for run in (out, v1):
        result = cli("stats", run, "--json")
        assert result.exit_code == 0, result.output
        stats = json.loads(result.output)
        loss = stats["loss"]
        assert (loss["normalization"], loss["train_on"]) == ("token", "all")
        assert loss["trained_turns"] == {"weight_1": stats["trained_runs"], "below_1": 0, "above_1": 0}
        assert loss["turn_weights"] == [{"weight": 1.0, "turns": stats["trained_runs"]}]
        assert loss["units"] == trained and loss["weight_sum"] == trained
        assert loss["mean_weight_per_unit"] == 1
    result = cli("inspect", v1, columns=120)
    assert result.exit_code == 0, result.output
    assert "loss:" not in result.output  # the plain loss: no line for it
    assert "w < 1" not in result.output and "weight-0" not in result.output
    out = convert(weighted, "token", "last")  # weight 1 turns, but not the plain loss
    result = cli("inspect", out, columns=120)
    assert "\nloss: token mean, train on last; 36 trained turns" in result.output


def runs_of(labels: np.ndarray) -> list[tuple[int, int]]:
    flags = np.concatenate([[0], (labels != -100).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flags))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def tree_ranges(row: dict) -> list[tuple[int, int]]:
    lens, parents = row["mask_spec"]["seg_lens"], row["mask_spec"]["seg_parents"]
    starts = np.concatenate([[0], np.cumsum(lens)]).tolist()
    roots = [s for s, parent in enumerate(parents) if parent == -1]
    return [(starts[a], starts[b]) for a, b in zip(roots, roots[1:] + [len(lens)], strict=True)]


@pytest.mark.parametrize(("normalization", "train_on"), SETTINGS)
def test_roles_tell_weighted_turns_apart(weighted, samples, normalization, train_on):
    """Per conversation of each row, its trained runs (from the labels) in order carry the
    input's weights of its trained turns: weight 1 `trained`, below `DOWN`, above `UP`."""
    out = convert(weighted, normalization, train_on)
    turns = trained_turns(weighted[1], samples, train_on)
    for row, read in zip(rows(out), iter_rows(open_run(out)), strict=True):
        roles = token_roles(read, [], normalization)
        labels = np.asarray(row["labels"])
        expected = np.full(len(labels), -1)
        for name, (start, end) in zip(row["conversation_ids"], tree_ranges(row), strict=True):
            runs = runs_of(labels[start:end])
            assert [end - start for start, end in runs] == [n for _, n in turns[name]]
            for (a, b), (weight, _) in zip(runs, turns[name], strict=True):
                expected[start + a : start + b] = Role.TRAINED if weight == 1 else Role.DOWN if weight < 1 else Role.UP
        trained = expected >= 0
        assert (roles[trained] == expected[trained]).all()
        assert not np.isin(roles[~trained], [Role.TRAINED, Role.DOWN, Role.UP]).any()


def weight_range(weights: list[float]) -> str:
    if not weights:
        return "-"
    low, high = min(weights), max(weights)
    return f"{low:.4g}" if low == high else f"{low:.4g}–{high:.4g}"


def test_inspect_lists_each_conversations_weights(weighted, samples):
    out = convert(weighted, "turn")
    turns = trained_turns(weighted[1], samples, "all")
    row = rows(out)[0]
    assert len(row["conversation_ids"]) == len(turns)  # one packed row
    for columns, lines in ((200, None), (100, 40), (80, 24)):
        result = cli("inspect", out, columns=columns) if lines is None else cli_lines(out, columns, lines)
        assert result.exit_code == 0, result.output
        output = result.output.splitlines()
        assert max(cell_len(line) for line in output) <= columns
        if lines is not None:
            assert len(output) <= lines - 1
        entries = ENTRY.findall(result.output)
        assert entries or lines is not None
        for name, *_, count, weights in entries:
            assert int(count) == len(turns[name])
            assert weights == weight_range([w for w, _ in turns[name]]), name
        if lines is None:
            assert {entry[0] for entry in entries} == set(turns)
    flat = [w for conversation in turns.values() for w, _ in conversation]
    head = (f"loss: turn mean, train on all; {len(flat)} trained turns: "
            f"{sum(w == 1 for w in flat)} weight 1, {sum(w < 1 for w in flat)} down, {sum(w > 1 for w in flat)} up")
    result = cli("inspect", out, columns=200)
    assert head + "\n" in result.output
    legend = "\n".join(result.output.splitlines()[-4:-2])
    assert "D trained, w < 1" in legend and "U trained, w > 1" in legend  # letters: no colour
    assert "(weight-0 turns: prompt/context)" in legend


def cli_lines(out, columns: int, lines: int):
    """`inspect` in a terminal of `columns` x `lines`."""
    return runner.invoke(app, ["inspect", str(out)], env={"COLUMNS": str(columns), "LINES": str(lines)})


@pytest.mark.parametrize("normalization", ["token", "conversation"])
def test_conversation_view_shows_each_trained_turns_weight(weighted, samples, normalization):
    out = convert(weighted, normalization)
    turns = trained_turns(weighted[1], samples, "all")
    name = next(  # a conversation with weight-1, lighter and heavier turns
        name for name, conversation in turns.items()
        if {w == 1 for w, _ in conversation} == {True, False} and any(w > 1 for w, _ in conversation)
        and any(w < 1 for w, _ in conversation)
    )
    result = cli("inspect", out, "--conversation", name, columns=120)
    assert result.exit_code == 0, result.output
    parts = re.findall(r"(trained(?:, w [<>] 1)?)\s+(\d+)\.\.(\d+) \((\d+) tok, weight ([\d.]+)\)", result.output)
    # One part per trained turn here (no branch splits a trained run in these layouts).
    assert [int(tokens) for *_, tokens, _ in parts] == [n for _, n in turns[name]]
    assert [weight for *_, weight in parts] == [f"{w:.4g}" for w, _ in turns[name]]
    names = {1: "trained"}
    assert [role for role, *_ in parts] == [
        names.get(w, "trained, w < 1" if w < 1 else "trained, w > 1") for w, _ in turns[name]
    ]
    assert max(cell_len(line) for line in result.output.splitlines()) <= 120


def test_png_colours_weighted_turns(weighted, samples, tmp_path):
    """--no-pack: one cell per token; a trained token's own cell (key = query, always
    visible) has the colour of its turn's weight."""
    out = convert(weighted, "turn", "all", "--no-pack")
    turns = trained_turns(weighted[1], samples, "all")
    table = rows(out)
    number = next(i for i, row in enumerate(table) if len(row["labels"]) <= 1000
                  and {w < 1 for w, _ in turns[row["conversation_ids"][0]]} == {True, False})
    row = table[number]
    png = tmp_path / "row.png"
    result = cli("inspect", out, "--row", number, "--png", png)
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(png).convert("RGB"))
    scale = max(1, round(picture.GRID_PX / len(row["labels"])))
    labels = np.asarray(row["labels"])
    for (a, b), (weight, _) in zip(runs_of(labels), turns[row["conversation_ids"][0]], strict=True):
        role = Role.TRAINED if weight == 1 else Role.DOWN if weight < 1 else Role.UP
        for j in (a, b - 1):
            centre = j * scale + scale // 2
            assert tuple(image[picture.TOP + centre, picture.LEFT + centre]) == ROLE_COLOURS[role]


def test_tokens_table_shows_the_stored_loss_weight(weighted):
    out = convert(weighted, "turn")
    row = rows(out)[0]
    labels = np.asarray(row["labels"])
    first = int(np.flatnonzero(labels != -100)[0])
    result = cli("inspect", out, "--tokens", f"{first - 1}:{first + 1}", columns=160)
    assert result.exit_code == 0, result.output
    lines = [line.split("│") for line in result.output.splitlines() if line.startswith("│")]
    heads = [line.split("┃") for line in result.output.splitlines() if line.startswith("┃")][0]
    column = [head.strip() for head in heads].index("loss weight")
    assert [line[column].strip() for line in lines] == ["-", f"{np.float32(row['loss_weights'][first]):.4g}"]
