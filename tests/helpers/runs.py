"""Real `convert` runs on sample_data, made once per test session and shared by the
inspect, stats and verify tests (which copy a run before changing it)."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from helpers.paths import SAMPLE
from onepass_prep.cli import app

_ROOT = tempfile.TemporaryDirectory(prefix="onepass-prep-tests-")  # removed at exit
runner = CliRunner()


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Records as a JSONL input file, one line each, as users write them."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def cli(*args, columns: int = 100):
    """Run the real command line with a fixed terminal width."""
    return runner.invoke(app, [str(arg) for arg in args], env={"COLUMNS": str(columns), "LINES": None})


@functools.cache
def converted(name: str, *extra: str, source: Path = SAMPLE) -> Path:
    """A run, made once per session for these arguments (`name` starts its folder's name;
    two tests that pick the same name still get a folder each)."""
    out = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_ROOT.name)) / "run"
    result = cli("convert", source, "--model", "qwen", "-o", out, *extra)
    assert result.exit_code == 0, result.output
    return out


@functools.cache
def long_input() -> Path:
    """The sample plus renamed copies of its first 22 chats: packs into one ~31k-token row
    with --no-share-prefixes (sharing would merge each copy into its original's tree)."""
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    copies = []
    for line in lines[:22]:
        record = json.loads(line)
        record["id"] += "-copy"
        copies.append(json.dumps(record, ensure_ascii=False))
    path = Path(_ROOT.name) / "long.jsonl"
    path.write_text("\n".join(lines + copies) + "\n", encoding="utf-8")
    return path


def rows(out: Path) -> list[dict]:
    return pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()


def row_number(out: Path, conversation_id: str) -> int:
    return next(i for i, row in enumerate(rows(out)) if conversation_id in row["conversation_ids"])
