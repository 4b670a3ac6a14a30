"""The real command line through Typer's runner, on real Parquet output."""

import json
import re
import subprocess
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from helpers.paths import ROOT
from typer.testing import CliRunner

from onepass_prep.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def test_convert_writes_shards_manifest_and_summary(tmp_path, sample_path):
    out = tmp_path / "out"
    result = run("convert", sample_path, "--model", "qwen", "-o", out, "--records-per-shard", "6",
                 "--max-seq-len", "8192")
    assert result.exit_code == 0, result.output
    assert "tokens N-pass" in result.output and "saving" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    lines = sample_path.read_text(encoding="utf-8").splitlines()
    assert manifest["format_version"] == 4
    assert manifest["counts"]["read"] == manifest["counts"]["written"] == len(lines)
    assert manifest["tokenizer"]["name"] == "qwen" and len(manifest["tokenizer"]["hash"]) == 64
    shards = sorted(out.glob("part-*.parquet"))
    assert [s["file"] for s in manifest["shards"]] == [s.name for s in shards]
    ids = [json.loads(line)["id"] for line in lines]
    assert len(shards) == 6  # 36 records, 6 per shard: each shard packs its own records
    for number, shard in enumerate(shards):
        held = [i for row in pq.read_table(shard).column("conversation_ids").to_pylist() for i in row]
        assert sorted(held) == sorted(ids[6 * number : 6 * number + 6])
    table = pq.read_table(shards)
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.schema.field("mask_spec").type == pa.struct(
        [("seg_lens", pa.list_(pa.int32())), ("seg_parents", pa.list_(pa.int32()))]
    )
    assert sum(table.column("num_tokens").to_pylist()) == manifest["tokens"]["one_pass"]
    assert max(table.column("num_tokens").to_pylist()) <= 8192
    ids = [cid for row in table.column("conversation_ids").to_pylist() for cid in row]
    assert sorted(ids) == sorted(json.loads(line)["id"] for line in lines)
    loaded = datasets.load_dataset("parquet", data_files=[str(s) for s in shards], split="train")
    assert loaded.num_rows == table.num_rows
    assert loaded[0]["input_ids"] == table.column("input_ids")[0].as_py()


def test_no_pack_writes_one_conversation_per_row(tmp_path, sample_path):
    result = run("convert", sample_path, "--model", "qwen", "-o", tmp_path, "--no-pack")
    assert result.exit_code == 0, result.output
    table = pq.read_table(sorted(tmp_path.glob("part-*.parquet")))
    assert all(len(ids) == 1 for ids in table.column("conversation_ids").to_pylist())


def test_too_long_conversations_are_rejected_not_dropped(tmp_path, sample_path):
    result = run("convert", sample_path, "--model", "qwen", "-o", tmp_path, "--max-seq-len", "700")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["rejected"] > 0 and counts["rejected_by_kind"] == {"too-long": counts["rejected"]}
    assert counts["read"] == counts["written"] + counts["rejected"]
    rejected = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == counts["rejected"]
    assert all(r["source"] == sample_path.name and r["line"] >= 1 for r in rejected)
    assert all("exceed --max-seq-len 700" in r["reason"] for r in rejected)


def test_non_empty_output_folder_is_refused_without_overwrite(tmp_path, sample_path):
    assert run("convert", sample_path, "--model", "qwen", "-o", tmp_path).exit_code == 0
    again = run("convert", sample_path, "--model", "qwen", "-o", tmp_path)
    assert again.exit_code == 1 and "not empty" in again.output
    assert run("convert", sample_path, "--model", "qwen", "-o", tmp_path, "--overwrite").exit_code == 0


def test_bad_think_tags_option_is_a_usage_error(tmp_path, sample_path):
    result = run("convert", sample_path, "--model", "qwen", "-o", tmp_path, "--think-tags", "<t>")
    assert result.exit_code == 2


def test_readme_demo_command_runs(tmp_path):
    """The README's first command, minus the set-up this test environment already has."""
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"<!-- demo-command -->\n```\n(.*)\n```", readme).group(1)
    steps = [step.split() for step in command.split(" && ") if "onepass-prep" in step]
    assert [step[1] for step in steps] == ["convert", "inspect"]
    out = tmp_path / "sample"
    for step in steps:
        args = [str(out) if arg == "out/sample" else arg for arg in step[1:]]
        result = subprocess.run(
            [sys.executable, "-m", "onepass_prep.cli", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
    assert (out / "manifest.json").is_file()
    assert "attention mask" in result.stdout and "trained" in result.stdout


def test_convert_does_not_import_torch(tmp_path, sample_path):
    code = (
        "import sys; from onepass_prep.cli import app; from typer.testing import CliRunner;"
        f"r = CliRunner().invoke(app, ['convert', {str(sample_path)!r}, '--model', 'qwen', '-o', {str(tmp_path)!r}]);"
        "assert r.exit_code == 0, r.output; print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_shards_read_as_they_are_in_duckdb_and_polars(tmp_path, sample_path):
    import duckdb
    import polars

    assert run("convert", sample_path, "--model", "qwen", "-o", tmp_path, "--no-pack").exit_code == 0
    shards = str(tmp_path / "part-*.parquet")
    expected = pq.read_table(sorted(tmp_path.glob("part-*.parquet")))
    first_ids = expected.column("input_ids")[0].as_py()
    frame = polars.read_parquet(shards)
    assert frame.height == expected.num_rows
    assert frame["input_ids"][0].to_list() == first_ids
    assert frame["mask_spec"].struct.field("seg_lens")[0].to_list() == expected.column("mask_spec")[0].as_py()["seg_lens"]
    rows, tokens = duckdb.sql(f"select count(*), sum(len(input_ids)) from read_parquet('{shards}')").fetchall()[0]
    assert (rows, tokens) == (expected.num_rows, sum(expected.column("num_tokens").to_pylist()))


def test_chat_template_kwargs_must_be_a_json_object_of_template_switches(tmp_path, sample_path):
    for value, message in (("{oops", "not JSON"), ("[1]", "expected a JSON object"),
                           ('{"tokenize": false}', "sets tokenize itself")):
        result = run("convert", sample_path, "--model", "qwen", "-o", tmp_path / "out",
                     "--chat-template-kwargs", value)
        assert result.exit_code == 2 and message in result.output, result.output
