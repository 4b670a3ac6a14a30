"""Loading refuses unfinished runs, unknown versions, wrong types and broken rows, by name."""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.torch_rows import make_row, random_row, table_of, write_run
from transformers import Qwen3Config
from typer.testing import CliRunner

from onepass_prep.cli import app
from onepass_prep.format import LOCK, list_columns, list_parts, validate_batch
from onepass_prep.torch import (
    FormatError,
    OnePassDataset,
    OnePassIterableDataset,
    check_vocab_size,
)

IDS = [10, 11, 12, 13, 14, 15, 16]
# seg 0 = tokens 0-2 (root), seg 1 = 3-4 and seg 2 = 5-6 (both under seg 0); token 5's
# parent is token 2, so token 5 may not carry a label.
BASE = make_row(IDS, [-100, 11, 12, 13, 14, -100, 16], [3, 2, 2], [-1, 0, 0])


def _set(**changes: object) -> Callable[[dict], None]:
    def mutate(row: dict) -> None:
        for key, value in changes.items():
            target = row["mask_spec"] if key in ("seg_lens", "seg_parents") else row
            target[key] = value

    return mutate


def _label(j: int, value: int) -> Callable[[dict], None]:
    def mutate(row: dict) -> None:
        row["labels"][j] = value
        row["num_trained_tokens"] = sum(label != -100 for label in row["labels"])

    return mutate


def _not_preorder(row: dict) -> None:
    # seg 3 hangs under seg 1 after seg 2 closed seg 1's subtree
    row.update(make_row([1, 2, 3, 4], [-100] * 4, [1, 1, 1, 1], [-1, 0, 0, 1]))


BROKEN = {
    "sum(seg_lens) != len(input_ids)": _set(seg_lens=[3, 2, 1]),
    "a seg_lens entry is < 1": _set(seg_lens=[3, 2, 2, 0], seg_parents=[-1, 0, 0, -1]),
    "seg_parents[s] is not -1 or < s": _set(seg_parents=[-1, 0, 2]),
    "seg_parents[s] is not -1 or < s ": _set(seg_parents=[0, 0, 0]),
    "seg_parents[s] is not -1 or < s  ": _set(seg_parents=[-2, 0, 0]),
    "segments not in depth-first pre-order": _not_preorder,
    "position_ids != tree depth": _set(position_ids=[0, 1, 2, 3, 4, 3, 5]),
    "label != input_ids at a trained token": _label(1, 99),
    "trained token whose parent is not the previous token": _label(5, 15),
    "trained token whose parent is not the previous token ": _label(0, 10),
    "num_tokens differs from len(input_ids)": _set(num_tokens=6),
    "num_trained_tokens differs from the labels": _set(num_trained_tokens=3),
    "len(labels) != len(input_ids)": _set(labels=[-100] * 8),
    "len(seg_parents) != len(seg_lens)": _set(seg_parents=[-1, 0]),
    "negative token id": _set(input_ids=[10, 11, -12, 13, 14, 15, 16]),
    "empty row": _set(input_ids=[], position_ids=[], labels=[], num_tokens=0, num_trained_tokens=0),
    "input_ids is null": _set(input_ids=None),
    "input_ids holds a null": _set(input_ids=[10, 11, None, 13, 14, 15, 16]),
    "loss weight != 0 at an untrained token": _set(loss_weights=[0.5, 1, 1, 1, 1, 0, 1]),
    "loss weight not > 0 and finite at a trained token": _set(loss_weights=[0, 1, 0, 1, 1, 0, 1]),
    "loss weight not > 0 and finite at a trained token ": _set(loss_weights=[0, 1, float("nan"), 1, 1, 0, 1]),
    "loss weight not > 0 and finite at a trained token  ": _set(loss_weights=[0, 1, -1, 1, 1, 0, 1]),
    "len(loss_weights) != len(input_ids)": _set(loss_weights=[0, 1]),
    "loss_units not in [0, num_trained_tokens]": _set(loss_units=6),
    "loss_units is 0 but tokens are trained, or the reverse": _set(loss_units=0),
    "loss_units is null": _set(loss_units=None),
}


def run_with(tmp_path: Path, broken: dict | None = None) -> Path:
    """Two shards of 4 rows (row groups of 2); row 5 (shard 1, row 1) is ``broken``."""
    rng = np.random.default_rng(0)
    rows = [random_row(rng, 6) for _ in range(8)]
    rows[5] = broken if broken is not None else copy.deepcopy(BASE)
    return write_run(tmp_path / "run", rows, rows_per_shard=4, rows_per_group=2)


def test_base_row_is_valid(tmp_path: Path) -> None:
    assert len(OnePassDataset(run_with(tmp_path), cache_dir=tmp_path / "cache")) == 8


@pytest.mark.parametrize("what", list(BROKEN))
def test_broken_row_is_named_by_file_and_row(tmp_path: Path, what: str) -> None:
    """The runtime's datasets and the CLI readers (stats, inspect) refuse a broken row with
    the same message: one check of the FORMAT.md rules serves them all."""
    row = copy.deepcopy(BASE)
    BROKEN[what](row)
    folder = run_with(tmp_path, row)
    expected = re.escape(f"{folder / 'part-00001.parquet'}: row 1: ") + r"(token \d+: )?" + re.escape(what.strip())
    with pytest.raises(FormatError, match=expected) as error:
        OnePassDataset(folder, cache_dir=tmp_path / "cache")
    message = str(error.value)
    with pytest.raises(FormatError, match=expected):
        list(OnePassIterableDataset(folder, shuffle=False))
    runner = CliRunner()
    for command in (["stats", str(folder)], ["stats", str(folder / "part-00001.parquet")]):
        result = runner.invoke(app, command, env={"COLUMNS": "1000"})
        assert result.exit_code == 1 and result.output == f"error: {message}\n", result.output
    cached = [path.name for path in (tmp_path / "cache").glob("*")]
    assert len(cached) == 1 and cached[0].startswith("part-00000-"), "a broken shard is not cached"


@pytest.mark.parametrize("at", [4, 5])
def test_the_reported_token_is_the_broken_one_and_a_label_never_starts_a_row(tmp_path: Path, at: int) -> None:
    """A labelled first token of a row is refused even where the row is the first of its
    batch (row 4 starts shard 1's first row group), and the message gives the token
    index within the row, whichever row of the batch it is."""
    rng = np.random.default_rng(0)
    rows = [random_row(rng, 6) for _ in range(8)]
    rows[at] = copy.deepcopy(BASE)
    _label(0, 10)(rows[at])
    folder = write_run(tmp_path / "run", rows, rows_per_shard=4, rows_per_group=2)
    with pytest.raises(FormatError, match=re.escape(f"row {at - 4}: token 0: trained token whose parent")):
        OnePassDataset(folder, cache_dir=tmp_path / "cache")
    rows[at] = copy.deepcopy(BASE)
    _set(position_ids=[0, 1, 2, 3, 4, 3, 5])(rows[at])
    folder = write_run(tmp_path / "run2", rows, rows_per_shard=4, rows_per_group=2)
    with pytest.raises(FormatError, match=re.escape(f"row {at - 4}: token 6: position_ids != tree depth")):
        OnePassDataset(folder, cache_dir=tmp_path / "cache2")


def test_rows_of_a_sliced_batch_are_read_and_checked_as_themselves() -> None:
    """Arrow slices keep their parent's offsets; readers take rows out of slices."""
    rng = np.random.default_rng(1)
    rows = [random_row(rng, 5) for _ in range(4)]
    table = table_of(rows)
    for start in range(4):
        part = table.slice(start, 2)
        validate_batch(part, "mem", start)
        offsets, values = list_parts(list_columns(part)["input_ids"])
        got = [values[offsets[i] : offsets[i + 1]].tolist() for i in range(part.num_rows)]
        assert got == [row["input_ids"] for row in rows[start : start + 2]]
    broken = copy.deepcopy(BASE)
    _label(5, 15)(broken)
    with pytest.raises(FormatError, match=re.escape("mem: row 3: token 5:")):
        validate_batch(table_of([*rows[:3], broken]).slice(2, 2), "mem", 2)


def test_a_manifest_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    folder = run_with(tmp_path)
    (folder / "manifest.json").write_text("[]")
    with pytest.raises(FormatError, match="not an onepass-prep manifest"):
        OnePassDataset(folder, cache_dir=tmp_path / "cache")


def test_folder_without_manifest_is_an_unfinished_run(tmp_path: Path) -> None:
    folder = run_with(tmp_path)
    (folder / "manifest.json").unlink()
    for source in (folder, folder / "part-00000.parquet"):
        with pytest.raises(FormatError, match="no manifest.json"):
            OnePassDataset(source, cache_dir=tmp_path / "cache")
        with pytest.raises(FormatError, match="no manifest.json"):
            OnePassIterableDataset(source)


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "v5", [copy.deepcopy(BASE)], 4, 2, version=5)
    with pytest.raises(FormatError, match="format_version 5 is unknown"):
        OnePassDataset(folder, cache_dir=tmp_path / "cache")
    with pytest.raises(FormatError, match="format_version 5 is unknown"):
        OnePassIterableDataset(folder)


def test_loose_shard_must_be_listed_and_match_the_manifest(tmp_path: Path) -> None:
    folder = run_with(tmp_path)
    assert len(OnePassDataset(folder / "part-00001.parquet", cache_dir=tmp_path / "c")) == 4
    stray = folder / "part-00009.parquet"
    stray.write_bytes((folder / "part-00000.parquet").read_bytes())
    with pytest.raises(FormatError, match="not listed"):
        OnePassDataset(stray, cache_dir=tmp_path / "c")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["rows"] = 5
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="4 rows, the manifest says 5"):
        OnePassIterableDataset(folder)


def test_wrong_column_type_is_named(tmp_path: Path) -> None:
    folder = run_with(tmp_path)
    path = folder / "part-00000.parquet"
    table = pq.read_table(path)
    index = table.schema.get_field_index("labels")
    table = table.set_column(index, "labels", table.column("labels").cast(pa.list_(pa.int64())))
    pq.write_table(table, path)
    with pytest.raises(FormatError, match=re.escape(f"{path}: column 'labels' is list<element: int64>")):
        OnePassDataset(folder, cache_dir=tmp_path / "cache")


def test_vocab_warning_for_a_model_that_cannot_embed_the_data(tmp_path: Path) -> None:
    rows = [make_row([5, 6, 900], [-100, 6, 900], [3], [-1])]
    dataset = OnePassIterableDataset(write_run(tmp_path / "run", rows, 4, 2))
    with pytest.warns(UserWarning, match="token id 900 but the model's vocabulary has 900"):
        check_vocab_size(Qwen3Config(vocab_size=900), dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_vocab_size(Qwen3Config(vocab_size=901), dataset)


def test_list_parts_of_a_slice_are_its_own_rows() -> None:
    array = pa.array([[1, 2], [3], [4, 5, 6], [7]], pa.list_(pa.int32())).slice(1, 2)
    offsets, values = list_parts(array)
    assert offsets.tolist() == [0, 1, 4] and values.tolist() == [3, 4, 5, 6]


@pytest.mark.parametrize(
    "holder, refused",
    [
        ({"pid": "own", "host": "this"}, True),  # a live process here: being written
        ({"pid": "dead", "host": "this"}, False),  # gone: a stale lock does not hide the run
        ({"pid": 1, "host": "another-host"}, True),  # cannot be checked from here
        ("not json", True),
    ],
    ids=["live", "dead", "other-host", "unreadable"],
)
def test_readers_refuse_a_folder_a_convert_is_writing(tmp_path: Path, holder, refused) -> None:
    folder = run_with(tmp_path)
    if isinstance(holder, dict):
        if holder["pid"] == "own":
            holder["pid"] = os.getpid()
        elif holder["pid"] == "dead":
            done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
            holder["pid"] = int(done.stdout)
        if holder["host"] == "this":
            holder["host"] = socket.gethostname()
        (folder / LOCK).write_text(json.dumps(holder))
    else:
        (folder / LOCK).write_text(holder)
    if not refused:
        assert len(OnePassDataset(folder, cache_dir=tmp_path / "cache")) == 8
        return
    shown = f"(pid {holder['pid']} on {holder['host']})" if isinstance(holder, dict) else "(pid None on None)"
    with pytest.raises(FormatError, match=re.escape(f"{folder}: a convert is writing this folder {shown}; read it when")):
        OnePassDataset(folder, cache_dir=tmp_path / "cache")


def test_missing_pieces_are_named(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="^no shards given$"):
        OnePassIterableDataset([])
    folder = run_with(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"] = "all"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=re.escape(f"{folder / 'manifest.json'}: 'shards' is not a list")):
        OnePassIterableDataset(folder)
    folder = run_with(tmp_path / "second")
    (folder / "part-00001.parquet").unlink()
    with pytest.raises(FormatError, match=re.escape(f"{folder / 'part-00001.parquet'}: listed in the manifest but missing")):
        OnePassIterableDataset(folder)
    (folder / "part-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(FormatError, match=re.escape(f"{folder / 'part-00001.parquet'}: not a readable Parquet file")):
        OnePassIterableDataset(folder)
    table = pq.read_table(folder / "part-00000.parquet").drop_columns(["labels"])
    pq.write_table(table, folder / "part-00001.parquet")
    with pytest.raises(FormatError, match=re.escape(f"{folder / 'part-00001.parquet'}: missing column 'labels'")):
        OnePassIterableDataset(folder)
    (folder / "manifest.json").write_text("{")
    with pytest.raises(FormatError, match=re.escape(f"{folder / 'manifest.json'}: not JSON")):
        OnePassIterableDataset(folder)
