"""Open a finished run (its folder or one of its shards) and read its rows, checked.

Every command that reads shards goes through here, so broken output (no manifest, an
unknown format version, a truncated file, a row that breaks docs/FORMAT.md) stops with the
file and row named instead of being drawn, counted or verified as if it were fine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa

from onepass_prep.convert.tokenizer import LoadedTokenizer, load_tokenizer
from onepass_prep.format import (
    IGNORE_INDEX,
    MANIFEST,
    REJECTED,
    FormatError,
    list_columns,
    list_parts,
    listed_shards,
    open_shard,
    read_manifest,
    root_segments,
    token_parents,
    token_subtree_end,
    validate_batch,
    with_loss_columns,
)


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
            raise FormatError(f"{path}: not JSON lines ({error})") from None


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
    loss_weights: np.ndarray  # float32 per token (1 per trained token in a v1 run)
    loss_units: int
    # per conversation id, the segments its samples use (v1, v2: its root's subtree)
    conversation_segments: list[np.ndarray] = field(default_factory=list)
    n_pass_pairs: int | None = None  # v4; not recorded before (stats.py derives what it can)

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
        return token_parents(self.seg_lens, self.seg_parents)

    @cached_property
    def subtree_end(self) -> np.ndarray:
        """Per token, the last token that sees it: q sees kv iff kv <= q <= subtree_end[kv]
        (the runtime's structure, the same function)."""
        return token_subtree_end(self.seg_lens, self.seg_parents)

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
        sample (tests/inspection/test_stats.py checks this against independently rendered samples).
        """
        flags = np.concatenate(([0], (self.labels != IGNORE_INDEX).astype(np.int8), [0]))
        edges = np.flatnonzero(np.diff(flags))
        return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def open_run(path: Path) -> Run:
    """A run from its output folder, or from one shard inside it (that shard only)."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or folder")
    folder = path if path.is_dir() else path.parent
    manifest = read_manifest(folder)
    listed = listed_shards(folder, manifest)
    if path.is_dir():
        return Run(folder, manifest, listed, 0, whole=True)
    names = [file.name for file, _, _ in listed]
    if path.name not in names:
        raise FormatError(f"{path}: not listed in {folder / MANIFEST}")
    index = names.index(path.name)
    first = sum(rows for _, rows, _ in listed[:index])
    return Run(folder, manifest, [listed[index]], first, whole=len(listed) == 1)


def iter_rows(run: Run) -> Iterator[ShardRow]:
    """Every row of the run's shards in order, each checked against FORMAT.md."""
    number = run.first_row
    for file, rows, tokens in run.shards:
        parquet = open_shard(file, rows, run.manifest["format_version"])
        seen_rows = seen_tokens = 0
        try:
            for batch in parquet.iter_batches(batch_size=64):
                for row in _batch_rows(batch, file, seen_rows, number):
                    seen_rows += 1
                    number += 1
                    seen_tokens += len(row)
                    yield row
        except (OSError, pa.ArrowException) as error:
            raise FormatError(f"{file}: cannot read Parquet ({error})") from None
        if seen_tokens != tokens:
            raise FormatError(f"{file}: {seen_tokens} tokens, the manifest says {tokens}")


def read_row(run: Run, number: int) -> ShardRow:
    """Row `number` of the run (counted across its shards in manifest order), checked."""
    offset = run.first_row
    for file, rows, _ in run.shards:
        if number < offset + rows:
            index = number - offset
            parquet = open_shard(file, rows, run.manifest["format_version"])
            try:
                for group in range(parquet.num_row_groups):
                    size = parquet.metadata.row_group(group).num_rows
                    if index < size:
                        batch = parquet.read_row_group(group).slice(index, 1).to_batches()[0]
                        return next(_batch_rows(batch, file, number - offset, number))
                    index -= size
            except (OSError, pa.ArrowException) as error:
                raise FormatError(f"{file}: cannot read Parquet ({error})") from None
        offset += rows
    first, last = run.first_row, run.first_row + run.num_rows - 1
    raise FormatError(f"{run.folder}: no row {number} (rows {first}..{last})")


def rows_holding(run: Run, conversation_id: str) -> list[int]:
    """Run-wide numbers of the rows (of the shards read) whose `conversation_ids` hold the
    id, read from that column alone."""
    found, number = [], run.first_row
    for file, rows, _ in run.shards:
        parquet = open_shard(file, rows, run.manifest["format_version"])
        try:
            for batch in parquet.iter_batches(batch_size=1024, columns=["conversation_ids"]):
                for ids in batch.column(0).to_pylist():
                    if conversation_id in ids:
                        found.append(number)
                    number += 1
        except (OSError, pa.ArrowException) as error:
            raise FormatError(f"{file}: cannot read Parquet ({error})") from None
    return found


def load_run_tokenizer(run: Run, model: str | None = None) -> tuple[LoadedTokenizer, bool]:
    """The run's tokenizer with the chat template the manifest recorded, and whether its
    hash matches the manifest's. `model` replaces the recorded name (e.g. a moved folder)."""
    recorded = run.manifest.get("tokenizer") or {}
    name = model or recorded.get("name")
    template = recorded.get("chat_template")
    if not isinstance(name, str) or not isinstance(template, str):
        raise FormatError(f"{run.folder / MANIFEST}: no tokenizer name and chat template recorded")
    try:
        loaded = load_tokenizer(name, template)
    except (OSError, ValueError) as error:
        raise FormatError(f"cannot load tokenizer {name!r} ({error}); pass --model") from None
    return loaded, loaded.hash == recorded.get("hash")


def _batch_rows(batch: pa.RecordBatch | pa.Table, file: Path, first: int, number: int) -> Iterator[ShardRow]:
    """The rows of a batch, checked by the format's one row check (docs/FORMAT.md)."""
    batch = with_loss_columns(pa.Table.from_batches([batch]))
    validate_batch(batch, file, first)
    parts = {name: list_parts(array) for name, array in list_columns(batch).items()}
    scalars = {}
    for name in ("num_tokens", "num_trained_tokens", "n_pass_tokens", "conversation_ids", "loss_units"):
        if batch.column(name).null_count:
            raise FormatError(f"{file}: rows from {first}: {name} holds a null")
        scalars[name] = batch.column(name).to_pylist()
    pairs = batch.column("n_pass_pairs").to_pylist() if "n_pass_pairs" in batch.column_names else None
    owners = None
    if "conversation_segments" in batch.column_names and not batch.column("conversation_segments").null_count:
        owners = batch.column("conversation_segments").to_pylist()
    for i in range(batch.num_rows):
        arrays = {name: values[off[i] : off[i + 1]] for name, (off, values) in parts.items()}
        owned = (
            [np.asarray(segments, np.int32) for segments in owners[i]] if owners
            else root_segments(arrays["seg_parents"])
        )
        yield ShardRow(
            file, first + i, number + i, **arrays,
            conversation_ids=scalars["conversation_ids"][i],
            num_tokens=scalars["num_tokens"][i],
            num_trained_tokens=scalars["num_trained_tokens"][i],
            n_pass_tokens=scalars["n_pass_tokens"][i],
            loss_units=scalars["loss_units"][i],
            conversation_segments=owned,
            n_pass_pairs=pairs[i] if pairs else None,
        )
