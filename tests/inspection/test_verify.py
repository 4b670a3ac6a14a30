"""`onepass-prep verify` passes on real converted output and fails, naming the place, on
shards changed one field at a time, on a different tokenizer and on broken files."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from helpers.paths import SAMPLE
from helpers.reference import source_samples
from helpers.runs import cli, converted, row_number, rows

from onepass_prep.format import SCHEMA


def no_pack():
    return converted("no-pack", "--no-pack")


def verify(out, *extra, source=SAMPLE):
    return cli("verify", out, "--input", source, *extra, columns=200)


def tampered(tmp_path, source, number, change):
    """A copy of the run whose row `number` went through `change` (a dict of lists), its
    loss columns kept consistent with its labels (the runs here use the token mean)."""
    out = tmp_path / "run"
    shutil.copytree(source, out)
    shard = out / "part-00000.parquet"
    table = pq.read_table(shard).to_pylist()
    change(table[number])
    row = table[number]
    row["loss_weights"] = [float(label != -100) for label in row["labels"]]
    row["loss_units"] = row["num_trained_tokens"]
    pq.write_table(pa.Table.from_pylist(table, schema=SCHEMA), shard, compression="zstd")
    return out


RECORDS = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]


def line_of(conversation_id: str) -> int:
    """1-based line of a conversation in the sample input."""
    return next(i for i, record in enumerate(RECORDS, start=1) if record["id"] == conversation_id)


def assistant_message(conversation_id: str, turn: int) -> int:
    """Index in the record's messages of the assistant message of trained turn `turn` (1-based)."""
    messages = RECORDS[line_of(conversation_id) - 1]["messages"]
    return [i for i, message in enumerate(messages) if message["role"] == "assistant"][turn - 1]


def labelled(table: list[dict]) -> int:
    return sum(label != -100 for row in table for label in row["labels"])


def depths(row) -> list[int]:
    """Tree depth per token by the FORMAT.md rule, for rows whose parents were changed."""
    lens, parents = row["mask_spec"]["seg_lens"], row["mask_spec"]["seg_parents"]
    starts = np.cumsum([0] + lens[:-1])
    depth = []
    for segment, (start, length) in enumerate(zip(starts, lens, strict=True)):
        parent = parents[segment]
        first = 0 if parent < 0 else depth[starts[parent] + lens[parent] - 1] + 1
        depth += range(first, first + length)
        assert len(depth) == start + length
    return depth


def test_verify_passes_on_real_output():
    out = converted("packed")
    result = verify(out)
    assert result.exit_code == 0, result.output
    # Counts from the oracle's samples (tests/helpers/reference.py) and the Parquet rows.
    conversations = source_samples(SAMPLE)
    samples = [sample for turns in conversations.values() for sample in turns]
    assert not (out / "rejected.jsonl").exists() or not (out / "rejected.jsonl").read_text().strip()
    pairs = sum(len(ids) - start for ids, start in samples)
    table = rows(out)
    assert labelled(table) == pairs  # what the OK line below claims, counted here
    assert (f"checked {len(conversations):,} conversations (0 more that the run rejected have no rows "
            f"to check), {len(samples):,} N-pass samples, {pairs:,} trained pairs; "
            f"{len(table):,} rows, {labelled(table):,} labelled tokens") in result.output.replace("\n", "")
    assert "OK: every trained pair appears with its total loss weight" in result.output


def test_verify_skips_what_the_run_rejected():
    result = verify(converted("max-700", "--max-seq-len", "700"))
    assert result.exit_code == 0, result.output
    rejected = len((converted("max-700", "--max-seq-len", "700") / "rejected.jsonl").read_text().splitlines())
    assert f"({rejected} more that the run rejected have no rows to check)" in result.output.replace("\n", " ")


def test_model_check_compares_losses(tmp_path):
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    subset = tmp_path / "subset.jsonl"
    subset.write_text("\n".join(lines[:3] + lines[20:23] + lines[-2:]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert cli("convert", subset, "--model", "qwen", "-o", out).exit_code == 0
    result = verify(out, "--model-check", source=subset)
    assert result.exit_code == 0, result.output
    trained = labelled(rows(out))  # one loss per labelled token of the rows
    assert trained == sum(len(ids) - start for turns in source_samples(subset).values() for ids, start in turns)
    assert f"model check: {trained:,} token losses compared, largest difference" in result.output


def test_unlabelled_trained_token_is_reported_with_conversation_and_turn(tmp_path):
    number = row_number(no_pack(), "math-001")
    spot = {}

    def unlabel(row):
        labels = np.asarray(row["labels"])
        second_run = np.flatnonzero((labels[1:] != -100) & (labels[:-1] == -100))[1] + 1
        spot.update(j=int(second_run), pos=row["position_ids"][second_run])
        row["labels"][second_run] = -100
        row["num_trained_tokens"] -= 1

    result = verify(tampered(tmp_path, no_pack(), number, unlabel))
    assert result.exit_code == 1
    assert "MISMATCH: 2 problems" in result.output  # the pair, and the row's loss_units
    assert (f"conversation math-001 ({SAMPLE.name}:{line_of('math-001')}), turn 2 "
            f"(message {assistant_message('math-001', 2)}), sample token {spot['pos']} "
            "'<think>': not trained with exactly its context and loss weight 1 in any row") in result.output
    trained = sum(len(ids) - start for ids, start in source_samples(SAMPLE)["math-001"])
    assert f"row of math-001: loss_units {trained - 1}, expected {trained}" in result.output


def test_extra_label_is_reported_with_row_and_token(tmp_path):
    number = row_number(no_pack(), "math-001")

    def label(row):
        row["labels"][10] = row["input_ids"][10]
        row["num_trained_tokens"] += 1

    out = tampered(tmp_path, no_pack(), number, label)
    result = verify(out)
    assert result.exit_code == 1
    assert f"row {number} ({out / 'part-00000.parquet'}: row {number}), token 10 " in result.output
    assert "labelled, but no N-pass sample trains this token with this context" in result.output


def test_changed_segment_parent_is_reported(tmp_path):
    """Segment 4 (math-001's last branch) hung under its trained sibling: positions are
    recomputed so every invariant holds, but the contexts are wrong."""
    number = row_number(no_pack(), "math-001")

    def reparent(row):
        assert row["mask_spec"]["seg_parents"] == [-1, 0, 0, 2, 2]
        row["mask_spec"]["seg_parents"][4] = 3
        row["position_ids"] = depths(row)

    result = verify(tampered(tmp_path, no_pack(), number, reparent))
    assert result.exit_code == 1
    assert (f"conversation math-001 ({SAMPLE.name}:{line_of('math-001')}), turn 3 "
            f"(message {assistant_message('math-001', 3)}), sample token ") in result.output
    assert f"row {number} (" in result.output and "labelled, but no N-pass sample" in result.output


def test_changed_position_breaks_an_invariant(tmp_path):
    number = row_number(no_pack(), "math-001")

    def shift(row):
        row["position_ids"][100] += 1

    out = tampered(tmp_path, no_pack(), number, shift)
    result = verify(out)
    assert result.exit_code == 1
    assert f"error: {out / 'part-00000.parquet'}: row {number}: token 100: position_ids != tree depth" in result.output
    assert "Traceback" not in result.output


def test_another_tokenizer_is_refused(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(converted("packed"), out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer"]["hash"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = verify(out)
    assert result.exit_code == 1
    assert "is not the one the run was converted with" in result.output


def test_broken_files_are_named_not_tracebacks(tmp_path):
    source = converted("packed")
    cases = {}
    for case in ("no-manifest", "version", "truncated"):
        out = tmp_path / case
        shutil.copytree(source, out)
        cases[case] = out
    (cases["no-manifest"] / "manifest.json").unlink()
    manifest = json.loads((cases["version"] / "manifest.json").read_text())
    manifest["format_version"] = 99
    (cases["version"] / "manifest.json").write_text(json.dumps(manifest))
    shard = cases["truncated"] / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    expected = {
        "no-manifest": f"{cases['no-manifest']}: no manifest.json",
        "version": "format_version 99 is unknown",
        "truncated": f"{shard}: not a readable Parquet file",
    }
    for case, out in cases.items():
        result = verify(out)
        assert result.exit_code == 1, case
        assert expected[case] in result.output.replace("\n", ""), result.output
        assert "Traceback" not in result.output


def test_input_that_is_not_the_converted_one(tmp_path):
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(SAMPLE.read_text(encoding="utf-8").splitlines(True)[:8]))
    result = verify(converted("packed"), source=subset)
    assert result.exit_code == 1
    assert f"the input holds 8 records, the run read {len(RECORDS)}" in result.output
    assert "chat-001" not in [record["id"] for record in RECORDS[:8]]
    assert "conversation chat-001: in 1 rows, expected 0" in result.output


def test_verify_one_shard_checks_its_conversations():
    out = converted("two-shards", "--no-pack", "--records-per-shard", "20")
    result = verify(out / "part-00001.parquet")
    assert result.exit_code == 0, result.output
    table = pq.read_table(out / "part-00001.parquet").to_pylist()
    conversations = {c for row in table for c in row["conversation_ids"]}
    samples = [s for c in conversations for s in source_samples(SAMPLE)[c]]
    assert (f"checked {len(conversations):,} conversations (0 more that the run rejected have no rows "
            f"to check), {len(samples):,} N-pass samples, {sum(len(i) - t for i, t in samples):,} trained pairs; "
            f"{len(table):,} rows, {labelled(table):,} labelled tokens") in result.output.replace("\n", "")
    assert "one shard of the run: only the conversations in its rows are checked" in result.output


def test_verify_without_model_check_does_not_import_torch():
    code = (
        "import sys; from onepass_prep.cli import app; from typer.testing import CliRunner;"
        f"r = CliRunner().invoke(app, ['verify', {str(converted('packed'))!r}, '--input', {str(SAMPLE)!r}]);"
        "assert r.exit_code == 0, r.output; print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
