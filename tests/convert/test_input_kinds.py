"""Every input kind converts to the rows of the same records given as JSONL: shards
byte for byte, rejections by record. Files are written by the real tools (gzip, zstd,
`datasets`), and a resumed run on a Parquet input writes the bytes of an uninterrupted one."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import synth
import zstandard
from helpers.paths import ROOT, SAMPLE
from helpers.runs import write_jsonl
from typer.testing import CliRunner

from onepass_prep.cli import app
from onepass_prep.convert import ConvertOptions, convert
from onepass_prep.convert.sources import open_source, python_source

OPTIONS = ("--max-seq-len", "4096", "--records-per-shard", "7")
RECORDS = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
OPENAI = [r for r in RECORDS if "messages" in r]
SHAREGPT = [r for r in RECORDS if "conversations" in r]


def cli_convert(source: Path | str, out: Path) -> None:
    result = CliRunner().invoke(app, ["convert", str(source), "--model", "qwen", "-o", str(out), *OPTIONS])
    assert result.exit_code == 0, result.output


def shards(out: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted(out.glob("part-*.parquet"))]


def rejections(out: Path) -> list[tuple]:
    lines = (out / "rejected.jsonl").read_text(encoding="utf-8").splitlines()
    return [(e["id"], e["line"], e["kind"]) for e in map(json.loads, lines)]


def as_jsonl(records: list[dict], path: Path) -> Path:
    write_jsonl(path, records)
    return path


def same_as_jsonl(tmp_path: Path, source: Path, records: list[dict]) -> None:
    """`source` converts to the bytes of `records` given as JSONL."""
    cli_convert(source, tmp_path / "kind")
    cli_convert(as_jsonl(records, tmp_path / "reference.jsonl"), tmp_path / "reference")
    assert shards(tmp_path / "kind") == shards(tmp_path / "reference")
    assert rejections(tmp_path / "kind") == rejections(tmp_path / "reference")
    assert len(shards(tmp_path / "kind")) == -(-len(records) // 7)


def as_read(source: Path) -> list[dict]:
    """The records as a table gives them back: a Parquet or Arrow struct column keeps one
    key order for all rows (docs/input.md), so the JSONL reference is written from it."""
    return [json.loads(raw) for _, raw in open_source(source).records()]


@pytest.mark.parametrize("kind", ["gzip", "zstd", "json-array"])
def test_compressed_jsonl_and_json_arrays(tmp_path, kind):
    text = as_jsonl(RECORDS, tmp_path / "plain.jsonl").read_bytes()
    source = tmp_path / "input"
    if kind == "gzip":
        source.write_bytes(gzip.compress(text))
    elif kind == "zstd":
        source.write_bytes(zstandard.ZstdCompressor().compress(text))
    else:
        source.write_text(json.dumps(RECORDS, ensure_ascii=False, indent=1), encoding="utf-8")
    same_as_jsonl(tmp_path, source, RECORDS)


def test_parquet_folder_written_by_datasets(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    datasets.Dataset.from_list(OPENAI).to_parquet(str(folder / "a.parquet"))
    datasets.Dataset.from_list(SHAREGPT).to_parquet(str(folder / "b.parquet"))
    same_as_jsonl(tmp_path, folder, as_read(folder))
    assert [r["id"] for r in as_read(folder)] == [r["id"] for r in OPENAI + SHAREGPT]


def test_save_to_disk_folder(tmp_path):
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(OPENAI).save_to_disk(str(folder))
    same_as_jsonl(tmp_path, folder, as_read(folder))


def test_standard_input(tmp_path):
    out = tmp_path / "stdin"
    with open(as_jsonl(RECORDS, tmp_path / "piped.jsonl"), "rb") as handle:
        done = subprocess.run([sys.executable, "-m", "onepass_prep.cli", "convert", "-", "--model", "qwen",
                               "-o", str(out), *OPTIONS], stdin=handle, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cli_convert(tmp_path / "piped.jsonl", tmp_path / "reference")
    assert shards(out) == shards(tmp_path / "reference")
    resumed = subprocess.run([sys.executable, "-m", "onepass_prep.cli", "convert", "-", "--model", "qwen",
                              "-o", str(out), "--resume"], stdin=subprocess.DEVNULL, cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 1 and "cannot be read a second time" in resumed.stderr


@pytest.mark.parametrize("form", ["list", "dataset"])
def test_python_data(tmp_path, form):
    data = OPENAI if form == "list" else datasets.Dataset.from_list(OPENAI)
    convert(data, tmp_path / "python", ConvertOptions(max_seq_len=4096, records_per_shard=7))
    read = OPENAI if form == "list" else [json.loads(raw) for _, raw in python_source(data).records()]
    cli_convert(as_jsonl(read, tmp_path / "reference.jsonl"), tmp_path / "reference")
    assert shards(tmp_path / "python") == shards(tmp_path / "reference")


def test_a_parquet_run_resumes_to_identical_bytes(tmp_path):
    records = [json.loads(line) for line in
               synth.write(tmp_path / "big.jsonl", 600, seed=4, turns=2, scale=0.08).read_text().splitlines()]
    data = tmp_path / "big.parquet"
    datasets.Dataset.from_list(records).to_parquet(str(data))
    command = [sys.executable, "-m", "onepass_prep.cli", "convert", str(data), "--model", "qwen",
               "--max-seq-len", "4096", "--records-per-shard", "30", "-o"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run([*command, str(whole)], cwd=ROOT, check=True, capture_output=True)
    process = subprocess.Popen([*command, str(cut)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while len(list(cut.glob("part-*.parquet"))) < 4:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    subprocess.run([*command, str(cut), "--resume"], cwd=ROOT, check=True, capture_output=True)
    assert {p.name: p.read_bytes() for p in cut.iterdir()} == {p.name: p.read_bytes() for p in whole.iterdir()}
