"""Finding the shards of a finished run and checking their schema (docs/FORMAT.md, v1)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

Source = str | Path | Sequence[str | Path]

_INT32_LIST = pa.list_(pa.int32())
SCHEMA: dict[str, pa.DataType] = {
    "input_ids": _INT32_LIST,
    "position_ids": _INT32_LIST,
    "labels": _INT32_LIST,
    "mask_spec": pa.struct([("seg_lens", _INT32_LIST), ("seg_parents", _INT32_LIST)]),
    "conversation_ids": pa.list_(pa.string()),
    "num_tokens": pa.int32(),
    "num_trained_tokens": pa.int32(),
    "n_pass_tokens": pa.int64(),
}


class FormatError(ValueError):
    """Data that breaks the on-disk contract; the message names the file (and row)."""


def read_manifest(folder: Path) -> dict:
    """The manifest of a finished run; a folder without one is an unfinished run."""
    path = folder / MANIFEST
    if not path.is_file():
        raise FormatError(f"{folder}: no {MANIFEST}, so this is not a finished onepass-prep run")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "onepass-prep":
        raise FormatError(f"{path}: 'format' is {manifest.get('format')!r}, not 'onepass-prep'")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{path}: format_version {version!r} is not supported (this reader knows {FORMAT_VERSION})"
        )
    return manifest


def _folder_shards(folder: Path) -> dict[Path, int]:
    manifest = read_manifest(folder)
    return {folder / entry["file"]: int(entry["rows"]) for entry in manifest["shards"]}


def resolve_shards(source: Source) -> list[Path]:
    """Shard files of output folders or of single shards, each checked against its manifest.

    A loose shard is read only if the folder it sits in holds a manifest that lists it, because
    the manifest is the only place that says the run finished and which format it wrote.
    """
    items = [source] if isinstance(source, str | Path) else list(source)
    if not items:
        raise FormatError("no shards given")
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            listed = _folder_shards(item)
            chosen = list(listed)
        else:
            listed = _folder_shards(item.parent)
            if item not in listed:
                raise FormatError(f"{item}: not listed in {item.parent / MANIFEST}")
            chosen = [item]
        for path in chosen:
            check_shard(path, listed[path])
        files.extend(chosen)
    return files


def open_shard(path: Path) -> pq.ParquetFile:
    """A shard's Parquet file; a truncated or corrupt one is named, not a bare Arrow error."""
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise FormatError(f"{path}: not a readable Parquet file ({error})") from None


def read_row_group(path: Path, group: int, first_row: int, columns: list[str]) -> pa.Table:
    try:
        return open_shard(path).read_row_group(group, columns=columns)
    except (OSError, pa.ArrowException) as error:
        raise FormatError(f"{path}: rows from {first_row}: cannot be read ({error})") from None


def check_shard(path: Path, rows: int) -> None:
    """The shard exists, has the manifest's row count and exactly the v1 column types."""
    if not path.is_file():
        raise FormatError(f"{path}: listed in the manifest but missing")
    meta = open_shard(path).metadata
    if meta.num_rows != rows:
        raise FormatError(f"{path}: {meta.num_rows} rows, the manifest says {rows}")
    check_schema(meta.schema.to_arrow_schema(), path)


def check_schema(schema: pa.Schema, path: Path) -> None:
    for name, expected in SCHEMA.items():
        index = schema.get_field_index(name)
        if index < 0:
            raise FormatError(f"{path}: missing column {name!r}")
        actual = schema.field(index).type
        if actual != expected:
            raise FormatError(f"{path}: column {name!r} is {actual}, expected {expected}")
