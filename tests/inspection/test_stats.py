"""`onepass-prep stats` against independent counts: N-pass samples rendered straight with
`apply_chat_template` (tests/reference.py) and masks built by the FORMAT.md rule."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.paths import SAMPLE, TEMPLATES
from helpers.reference import dense_mask, source_samples
from helpers.runs import cli, converted, rows, write_jsonl

from onepass_prep.inspection.runs import iter_rows, open_run

TEMPLATE_FILES = {
    "qwen3": None,
    "keep": TEMPLATES / "keep_reasoning.jinja",
    "strip": TEMPLATES / "strip_history.jinja",
}


def template_options(template: str) -> tuple[str, ...]:
    path = TEMPLATE_FILES[template]
    return ("--chat-template", str(path)) if path else ()


def reference_samples(template: str) -> dict[str, list[tuple[list[int], int]]]:
    """Each sample conversation's N-pass samples, rendered without the converter."""
    return source_samples(SAMPLE, TEMPLATE_FILES[template])


def input_records() -> int:
    """Records in the sample input, counted off the file itself."""
    return sum(1 for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip())


def stats_json(out) -> dict:
    result = cli("stats", out, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("template", ["qwen3", "keep", "strip"])
def test_trained_runs_are_the_n_pass_samples(template):
    """The derivation stats relies on, proved on real layouts: per conversation, the trained
    runs are the samples with trained tokens, and each ends at depth len(sample) - 1. (In a
    tree that conversations share several samples can end at one run: see
    test_n_pass_pairs_of_shared_trees_are_exact.)"""
    out = converted(f"no-pack-unshared-{template}", "--no-pack", "--no-share-prefixes", *template_options(template))
    expected = reference_samples(template)
    for row in iter_rows(open_run(out)):
        samples = expected[row.conversation_ids[0]]
        derived = [int(row.position_ids[end - 1]) + 1 for _, end in row.trained_runs]
        assert derived == [len(ids) for ids, start in samples if start < len(ids)]
        assert sum(derived) == row.n_pass_tokens


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "no-pack"])
def test_stats_numbers_match_independent_counts(pack):
    out = converted("packed") if pack else converted("no-pack", "--no-pack")
    stats = stats_json(out)
    samples = [s for conversation in reference_samples("qwen3").values() for s in conversation]
    table = rows(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert stats["rows"] == len(table) and stats["shards"] == len(manifest["shards"])
    assert stats["conversations"] == len(reference_samples("qwen3")) == input_records()
    assert stats["trained_runs"] == sum(start < len(ids) for ids, start in samples)
    assert stats["tokens"]["one_pass"] == sum(row["num_tokens"] for row in table)
    assert stats["tokens"]["n_pass"] == sum(len(ids) for ids, _ in samples)
    assert stats["tokens"]["trained"] == sum(len(ids) - start for ids, start in samples)
    n_pass_pairs = sum(len(ids) * (len(ids) + 1) // 2 for ids, _ in samples)
    assert stats["attention_pairs"]["n_pass"] == n_pass_pairs
    assert stats["attention_pairs"]["rows_without_n_pass"] == 0
    if not pack:  # small rows: count the FORMAT.md mask itself
        one_pass_pairs = sum(
            int(dense_mask(row["mask_spec"]["seg_lens"], row["mask_spec"]["seg_parents"]).sum())
            for row in table
        )
        assert stats["attention_pairs"]["one_pass"] == one_pass_pairs
    lengths = [row["num_tokens"] for row in table]
    assert stats["row_length"]["max"] == max(lengths) and stats["row_length"]["min"] == min(lengths)
    assert sum(b["rows"] for b in stats["row_length"]["histogram"]) == len(table)
    capacity = len(table) * manifest["options"]["max_seq_len"]
    assert stats["packing"]["padding_tokens"] == capacity - sum(lengths)
    assert stats["packing"]["fill_rate"] == pytest.approx(manifest["fill_rate"], abs=1e-6)


def test_rejections_by_kind_come_from_the_manifest():
    out = converted("max-700", "--max-seq-len", "700")
    stats = stats_json(out)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert stats["run"]["rejected"] == len(rejected) > 0
    assert stats["run"]["rejected_by_kind"] == {"too-long": len(rejected)}
    assert stats["run"]["read"] == input_records()
    assert stats["conversations"] == input_records() - len(rejected)
    assert stats["row_length"]["max"] <= 700


def table_cells(text: str, label: str) -> list[str]:
    """The stripped cells of the stats table's row called `label`."""
    line = next(line for line in text.splitlines() if line.startswith(f"│ {label} "))
    return [cell.strip() for cell in line.split("│")[1:-1]]


def test_stats_table_and_histogram():
    out = converted("no-pack", "--no-pack")
    result = cli("stats", out)
    assert result.exit_code == 0, result.output
    text = result.output
    for label in ("shards / rows", "turns (trained runs)", "attention pairs", "fill rate",
                  "padding to max_seq_len", "run: rejected", "row length (tokens)"):
        assert label in text
    # One-pass: the tokens of the rows as Parquet holds them; N-pass: the tokens of the
    # samples the oracle renders (no converter, no stats code).
    one_pass = sum(row["num_tokens"] for row in rows(out))
    samples = [s for conversation in reference_samples("qwen3").values() for s in conversation]
    n_pass = sum(len(ids) for ids, _ in samples)
    assert one_pass < n_pass
    header = next(line for line in text.splitlines() if "one-pass" in line)
    assert [cell.strip() for cell in header.split("│")[1:-1]] == ["", "one-pass", "N-pass"]
    assert table_cells(text, "tokens") == ["tokens", f"{one_pass:,}", f"{n_pass:,}"]
    trained = sum(len(ids) - start for ids, start in samples)
    assert table_cells(text, "trained tokens") == ["trained tokens", f"{trained:,}", ""]
    assert table_cells(text, "turns (trained runs)")[1] == f"{sum(s < len(i) for i, s in samples):,}"
    histogram = [line for line in text.splitlines() if "–" in line and line.rstrip().endswith("█")]
    assert len(histogram) >= 5
    assert max(len(line) for line in text.splitlines()) <= 100


def test_stats_of_one_shard_and_errors(tmp_path):
    out = converted("two-shards", "--no-pack", "--records-per-shard", "20")
    first = stats_json(out / "part-00000.parquet")
    second = stats_json(out / "part-00001.parquet")
    assert (first["rows"], second["rows"]) == (20, len(rows(out)) - 20)
    assert first["tokens"]["n_pass"] + second["tokens"]["n_pass"] == stats_json(out)["tokens"]["n_pass"]
    (tmp_path / "part-00000.parquet").write_bytes((out / "part-00000.parquet").read_bytes())
    result = cli("stats", tmp_path / "part-00000.parquet")
    assert result.exit_code == 1 and "no manifest.json" in result.output
    assert np.isclose(first["attention_pairs"]["saving"], 1 - first["attention_pairs"]["one_pass"] / first["attention_pairs"]["n_pass"])


def test_stats_reports_the_audits_of_dropped_reasoning_and_tool_calls(tmp_path):
    """DeepSeek-R1's template strips the trained turn's reasoning and, with the content
    transformers drops when it is null, renders no tool call: the summary warns, and the
    manifest and `stats` count both (2 turns with tool calls, 1 with reasoning, all lost)."""
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}
    chats = [
        {"messages": [{"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "c1", "content": "found"},
                      {"role": "assistant", "content": "Done."}]},
        {"messages": [{"role": "user", "content": "Why?"},
                      {"role": "assistant", "content": "<think>Because.</think>Sure."},
                      {"role": "user", "content": "Again"},
                      {"role": "assistant", "content": None, "tool_calls": [call]}]},
    ]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    out = tmp_path / "out"
    result = cli("convert", data, "--model", "qwen", "-o", out,
                 "--chat-template", TEMPLATES / "deepseek-r1-distill-qwen.jinja", columns=400)
    assert result.exit_code == 0, result.output
    assert "2 of 2 trained turns with tool calls are trained without one of them" in result.output
    assert "1 of 1 trained turns with reasoning" in result.output
    stats = stats_json(out)
    assert stats["tool_call_audit"] == {"turns_with_tool_calls": 2, "tool_calls_dropped": 2}
    assert stats["reasoning_audit"] == {"turns_with_reasoning": 1, "reasoning_dropped": 1}
    table = cli("stats", out).output
    assert table_cells(table, "tool calls dropped")[1] == "2 of 2 turns"


SHARED_CHATS = 6  # sample chats of several turns that shared_input copies


@pytest.fixture(scope="module")
def shared_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first sample chats of several turns, each with a copy that ends after its first
    assistant turn and a copy whose last answer differs: trees that conversations share,
    with branches at a turn and conversations that end inside another's path. Then the
    sample's tool chats, each with copies that end after its first and second assistant
    turns: Qwen3 keeps the reasoning of a tool chain, so each copy is the start of the
    longer chats (several in a row), and the samples ending inside a segment another
    conversation continues are not seen in the tree."""
    records: list[dict] = []
    tools: list[dict] = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        turns = [i for i, message in enumerate(record.get("messages", [])) if message["role"] == "assistant"]
        if any(message.get("tool_calls") for message in record.get("messages", [])):
            tools += [record] + [
                {**record, "id": f"{record['id']}-{n}", "messages": record["messages"][: turns[n] + 1]} for n in (0, 1)
            ]
        if len(turns) < 2 or len(records) == 3 * SHARED_CHATS:
            continue
        other = copy.deepcopy(record["messages"])
        other[turns[-1]]["content"] = "A different answer."
        records += [record, {**record, "id": record["id"] + "-first", "messages": record["messages"][: turns[0] + 1]},
                    {**record, "id": record["id"] + "-other", "messages": other}]
    path = tmp_path_factory.mktemp("shared") / "shared.jsonl"
    write_jsonl(path, records + tools)
    return path


SHARED_CASES = [("strip", "all"), ("keep", "all"), ("keep", "last"), ("qwen3", "all")]


@pytest.mark.parametrize(("template", "train_on"), SHARED_CASES)
def test_n_pass_pairs_of_shared_trees_are_exact(template, train_on, shared_input):
    """Trees that conversations share (the sample's system prompts, first turns and prompts
    with two answers make them; under the keep template and Qwen3's tool chains, chats
    that are each the start of another): the N-pass tokens and pairs equal those of the
    samples rendered without the converter (--train-on last: each conversation's last)."""
    data = shared_input
    out = converted(f"shared-{template}-{train_on}", "--train-on", train_on, *template_options(template), source=data)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokens"]["one_pass"] < manifest["tokens"]["unshared"]  # trees are shared
    stats = stats_json(out)
    trained = [[s for s in samples if s[1] < len(s[0])] for samples in source_samples(data, TEMPLATE_FILES[template]).values()]
    samples = [s for conversation in trained for s in (conversation if train_on == "all" else conversation[-1:])]
    assert stats["tokens"]["n_pass"] == sum(len(ids) for ids, _ in samples)
    assert stats["attention_pairs"]["n_pass"] == sum(len(ids) * (len(ids) + 1) // 2 for ids, _ in samples)
    assert stats["attention_pairs"]["rows_without_n_pass"] == 0
    pairs = table_cells(cli("stats", out).output, "attention pairs")
    assert pairs[2] == f"{stats['attention_pairs']['n_pass']:,}"


def as_format_v3(run: Path, folder: Path) -> Path:
    """A copy of a run as format v3 wrote it: no n_pass_pairs column."""
    shutil.copytree(run, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:
        shard = folder / entry["file"]
        pq.write_table(pq.read_table(shard).drop_columns(["n_pass_pairs"]), shard, compression="zstd")
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format_version": 3}))
    return folder


def test_n_pass_pairs_of_a_v3_run(tmp_path, shared_input):
    """A v3 run records no N-pass pairs: where each tree holds one conversation they are
    derived (one sample ends at each trained run), the same as v4 records; a shared tree
    does not determine them, so none are shown rather than an estimate."""
    unshared = converted("no-pack", "--no-pack")
    assert stats_json(as_format_v3(unshared, tmp_path / "unshared"))["attention_pairs"] == stats_json(unshared)["attention_pairs"]
    shared = as_format_v3(converted("shared-qwen3-all", "--train-on", "all", source=shared_input), tmp_path / "shared")
    pairs = stats_json(shared)["attention_pairs"]
    assert pairs["n_pass"] is None and pairs["saving"] is None and pairs["rows_without_n_pass"] > 0
    text = cli("stats", shared).output
    assert table_cells(text, "attention pairs")[2] == "?"
    assert "earlier format" in text
