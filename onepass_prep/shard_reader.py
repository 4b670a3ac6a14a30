"""Open a finished run (its folder or one of its shards) and read its rows, checked.

Every command that reads shards goes through here, so broken output (no manifest, an
unknown format version, a truncated file, a row that breaks docs/FORMAT.md) stops with the
file and row named instead of being drawn, counted or verified as if it were fine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from onepass_prep import FORMAT_VERSION
from onepass_prep.shards import MANIFEST, REJECTED, SCHEMA
from onepass_prep.tokenizer import LoadedTokenizer, load_tokenizer

IGNORE = -100
LIST_COLUMNS = ("input_ids", "position_ids", "labels")


class ShardError(Exception):
    """Output that cannot be read as format v1; the message names the file (and row)."""


@dataclass
class Run:
    """A finished run: its manifest and the shards to read (all of them, or the one given)."""

    folder: Path
    manifest: dict
    shards: list[tuple[Path, int, int]]  # (file, rows, tokens) as the manifest lists them
    first_row: int  # run-wide number of the first row of the first shard read
    whole: bool  # every shard of the run is read

    @property
    def num_rows(self) -> int:
        return sum(rows for _, rows, _ in self.shards)

    def rejected(self) -> list[dict]:
        """The run's rejected.jsonl entries (for the whole run, whichever shards are read)."""
        path = self.folder / REJECTED
        if not path.is_file():
            return []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            return [json.loads(line) for line in lines if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ShardError(f"{path}: not JSON lines ({error})") from None


@dataclass
class ShardRow:
    """One row as numpy arrays, with the tree arithmetic the views and checks share."""

    file: Path
    index: int  # row within its file
    number: int  # row within the run
    input_ids: np.ndarray
    position_ids: np.ndarray
    labels: np.ndarray
    seg_lens: np.ndarray
    seg_parents: np.ndarray
    conversation_ids: list[str]
    num_tokens: int
    num_trained_tokens: int
    n_pass_tokens: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def where(self) -> str:
        return f"{self.file}: row {self.index}"

    @cached_property
    def seg_starts(self) -> np.ndarray:
        return np.cumsum(self.seg_lens, dtype=np.int64) - self.seg_lens

    @cached_property
    def segment_of(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.seg_lens)), self.seg_lens)

    @cached_property
    def parent_token(self) -> np.ndarray:
        """Tree parent per token (FORMAT.md): j - 1, or the parent segment's last token."""
        parent = np.arange(len(self), dtype=np.int64) - 1
        ends = self.seg_starts + self.seg_lens - 1
        parent[self.seg_starts] = np.where(
            self.seg_parents >= 0, ends[np.maximum(self.seg_parents, 0)], -1
        )
        return parent

    @cached_property
    def subtree_end(self) -> np.ndarray:
        """Per segment, one past the last token of its subtree: in pre-order a subtree is a
        contiguous run of segments, so token q sees kv iff kv <= q < subtree_end[seg(kv)]."""
        last = np.arange(len(self.seg_lens))
        for segment in range(len(last) - 1, 0, -1):
            parent = self.seg_parents[segment]
            if parent >= 0 and last[segment] > last[parent]:
                last[parent] = last[segment]
        return self.seg_starts[last] + self.seg_lens[last]

    @cached_property
    def trees(self) -> list[tuple[int, int]]:
        """Token ranges of the row's trees (one per root segment), in row order."""
        starts = self.seg_starts[self.seg_parents < 0].tolist()
        return list(zip(starts, starts[1:] + [len(self)], strict=True))

    @cached_property
    def trained_runs(self) -> list[tuple[int, int]]:
        """Maximal stretches of labelled tokens, as token ranges.

        Each labelled token's parent is the token before it (FORMAT.md), so a stretch is one
        path in the tree: in the converter's layouts, the trained tokens of one N-pass
        sample (tests/test_stats.py checks this against independently rendered samples).
        """
        flags = np.concatenate(([0], (self.labels != IGNORE).astype(np.int8), [0]))
        edges = np.flatnonzero(np.diff(flags))
        return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def open_run(path: Path) -> Run:
    """A run from its output folder, or from one shard inside it (that shard only)."""
    path = Path(path)
    if not path.exists():
        raise ShardError(f"{path}: no such file or folder")
    folder = path if path.is_dir() else path.parent
    manifest = read_manifest(folder)
    try:
        listed = [(folder / e["file"], int(e["rows"]), int(e["tokens"])) for e in manifest["shards"]]
    except (KeyError, TypeError, ValueError):
        raise ShardError(f"{folder / MANIFEST}: 'shards' is not a list of file/rows/tokens") from None
    if path.is_dir():
        return Run(folder, manifest, listed, 0, whole=True)
    names = [file.name for file, _, _ in listed]
    if path.name not in names:
        raise ShardError(f"{path}: not listed in {folder / MANIFEST}")
    index = names.index(path.name)
    first = sum(rows for _, rows, _ in listed[:index])
    return Run(folder, manifest, [listed[index]], first, whole=len(listed) == 1)


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise ShardError(f"{folder}: no {MANIFEST}, so this is not a finished onepass-prep run")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardError(f"{path}: not JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "onepass-prep":
        raise ShardError(f"{path}: not an onepass-prep manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(
            f"{path}: format_version {manifest.get('format_version')!r} is unknown "
            f"(this version reads {FORMAT_VERSION})"
        )
    return manifest


def iter_rows(run: Run) -> Iterator[ShardRow]:
    """Every row of the run's shards in order, each checked against FORMAT.md."""
    number = run.first_row
    for file, rows, tokens in run.shards:
        parquet = _open_shard(file, rows)
        seen_rows = seen_tokens = 0
        try:
            for batch in parquet.iter_batches(batch_size=64):
                for row in _batch_rows(batch, file, seen_rows, number):
                    seen_rows += 1
                    number += 1
                    seen_tokens += len(row)
                    yield row
        except (OSError, pa.ArrowException) as error:
            raise ShardError(f"{file}: cannot read Parquet ({error})") from None
        if seen_tokens != tokens:
            raise ShardError(f"{file}: {seen_tokens} tokens, the manifest says {tokens}")


def read_row(run: Run, number: int) -> ShardRow:
    """Row `number` of the run (counted across its shards in manifest order), checked."""
    offset = run.first_row
    for file, rows, _ in run.shards:
        if number < offset + rows:
            index = number - offset
            parquet = _open_shard(file, rows)
            try:
                for group in range(parquet.num_row_groups):
                    size = parquet.metadata.row_group(group).num_rows
                    if index < size:
                        batch = parquet.read_row_group(group).slice(index, 1).to_batches()[0]
                        return next(_batch_rows(batch, file, number - offset, number))
                    index -= size
            except (OSError, pa.ArrowException) as error:
                raise ShardError(f"{file}: cannot read Parquet ({error})") from None
        offset += rows
    first, last = run.first_row, run.first_row + run.num_rows - 1
    raise ShardError(f"{run.folder}: no row {number} (rows {first}..{last})")


def load_run_tokenizer(run: Run, model: str | None = None) -> tuple[LoadedTokenizer, bool]:
    """The run's tokenizer with the chat template the manifest recorded, and whether its
    hash matches the manifest's. `model` replaces the recorded name (e.g. a moved folder)."""
    recorded = run.manifest.get("tokenizer") or {}
    name = model or recorded.get("name")
    template = recorded.get("chat_template")
    if not isinstance(name, str) or not isinstance(template, str):
        raise ShardError(f"{run.folder / MANIFEST}: no tokenizer name and chat template recorded")
    try:
        loaded = load_tokenizer(name, template)
    except (OSError, ValueError) as error:
        raise ShardError(f"cannot load tokenizer {name!r} ({error}); pass --model") from None
    return loaded, loaded.hash == recorded.get("hash")


def _open_shard(file: Path, rows: int) -> pq.ParquetFile:
    if not file.is_file():
        raise ShardError(f"{file}: listed in the manifest but missing")
    try:
        parquet = pq.ParquetFile(file)
    except (OSError, pa.ArrowException) as error:
        raise ShardError(f"{file}: cannot read Parquet ({error})") from None
    if parquet.metadata.num_rows != rows:
        raise ShardError(f"{file}: {parquet.metadata.num_rows} rows, the manifest says {rows}")
    schema = parquet.schema_arrow
    for field in SCHEMA:
        if field.name not in schema.names or schema.field(field.name).type != field.type:
            raise ShardError(f"{file}: column {field.name!r} missing or not {field.type}")
    return parquet


def _list_parts(column: pa.Array, name: str, file: Path, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and values of a list column; a null anywhere is a broken row."""
    offsets = column.offsets.to_numpy()
    values = column.values.slice(offsets[0], offsets[-1] - offsets[0])
    offsets = offsets - offsets[0]
    if column.null_count:
        row = int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
        raise ShardError(f"{file}: row {first + row}: {name} is null")
    if values.null_count:
        flat = int(np.argmax(values.is_null().to_numpy(zero_copy_only=False)))
        row = int(np.searchsorted(offsets, flat, side="right")) - 1
        raise ShardError(f"{file}: row {first + row}: {name} holds a null")
    return offsets, values.to_numpy()


def _batch_rows(batch: pa.RecordBatch, file: Path, first: int, number: int) -> Iterator[ShardRow]:
    parts = {name: _list_parts(batch.column(name), name, file, first) for name in LIST_COLUMNS}
    spec = batch.column("mask_spec")
    if spec.null_count:
        raise ShardError(f"{file}: row {first + int(np.argmax(spec.is_null()))}: mask_spec is null")
    for field, child in zip(spec.type, spec.flatten(), strict=True):  # flatten honours slicing
        parts[field.name] = _list_parts(child, field.name, file, first)
    scalars = {}
    for name in ("num_tokens", "num_trained_tokens", "n_pass_tokens", "conversation_ids"):
        if batch.column(name).null_count:
            raise ShardError(f"{file}: rows from {first}: {name} holds a null")
        scalars[name] = batch.column(name).to_pylist()
    for i in range(batch.num_rows):
        arrays = {name: values[off[i] : off[i + 1]] for name, (off, values) in parts.items()}
        row = ShardRow(
            file, first + i, number + i, **arrays,
            conversation_ids=scalars["conversation_ids"][i],
            num_tokens=scalars["num_tokens"][i],
            num_trained_tokens=scalars["num_trained_tokens"][i],
            n_pass_tokens=scalars["n_pass_tokens"][i],
        )
        check_row(row)
        yield row


def check_row(row: ShardRow) -> None:
    """The FORMAT.md v1 row invariants; raise ShardError naming the file, row and token."""

    def fail(what: str) -> None:
        raise ShardError(f"{row.where}: {what}")

    length = len(row.input_ids)
    if length == 0:
        fail("empty row")
    if row.num_tokens != length:
        fail(f"num_tokens {row.num_tokens} but {length} input_ids")
    for name in ("position_ids", "labels"):
        if len(getattr(row, name)) != length:
            fail(f"len({name}) != len(input_ids)")
    lens, parents = row.seg_lens, row.seg_parents
    if len(lens) == 0 or len(parents) != len(lens):
        fail("seg_lens and seg_parents are empty or of different lengths")
    if (lens < 1).any():
        fail(f"seg_lens[{int(np.argmax(lens < 1))}] < 1")
    if int(lens.sum()) != length:
        fail(f"sum(seg_lens) = {int(lens.sum())}, not {length}")
    bad = (parents < -1) | (parents >= np.arange(len(parents)))
    if bad.any():
        fail(f"seg_parents[{int(np.argmax(bad))}] is not -1 or an earlier segment")
    path: list[int] = []  # the open root-to-segment path of a depth-first pre-order walk
    for segment, parent in enumerate(parents.tolist()):
        while path and path[-1] != parent:
            path.pop()
        if parent >= 0 and not path:
            fail(f"segment {segment} breaks depth-first pre-order (parent {parent} is closed)")
        path.append(segment)
    if (row.input_ids < 0).any():
        fail(f"negative token id at token {int(np.argmax(row.input_ids < 0))}")
    parent = row.parent_token
    depth = np.where(parent >= 0, row.position_ids[np.maximum(parent, 0)] + 1, 0)
    wrong = row.position_ids != depth
    if wrong.any():
        j = int(np.argmax(wrong))
        fail(f"position_ids[{j}] = {row.position_ids[j]}, but the token's tree depth is {depth[j]}")
    trained = row.labels != IGNORE
    wrong = trained & (row.labels != row.input_ids)
    if wrong.any():
        fail(f"labels[{int(np.argmax(wrong))}] is neither -100 nor the token id")
    wrong = trained & (parent != np.arange(length) - 1)
    if wrong.any():
        fail(f"token {int(np.argmax(wrong))} is labelled but its parent is not the token before it")
    if int(trained.sum()) != row.num_trained_tokens:
        fail(f"num_trained_tokens {row.num_trained_tokens} but {int(trained.sum())} labels")
