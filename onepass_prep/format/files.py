"""The files of a run (docs/FORMAT.md, v4; v1 to v3 still read): names, the shard schema, the
manifest, and the checks every reader makes before it trusts a shard."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 4
READ_VERSIONS = (1, 2, 3, 4)  # v1 rows read as message weights 1 under the token mean
FORMAT_NAME = "onepass-prep"
MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl"
LOCK = ".onepass-prep.lock"  # held by a convert writing the folder: {"pid": .., "host": ..}
IGNORE_INDEX = -100  # the label of a token that is not trained

Source = str | Path | Sequence[str | Path]

NORMALIZATIONS = ("token", "turn", "conversation")
TRAIN_ON = ("all", "last")

_INT32_LIST = pa.list_(pa.int32())
SCHEMA_V1 = pa.schema(
    [
        ("input_ids", _INT32_LIST),
        ("position_ids", _INT32_LIST),
        ("labels", _INT32_LIST),
        ("mask_spec", pa.struct([("seg_lens", _INT32_LIST), ("seg_parents", _INT32_LIST)])),
        ("conversation_ids", pa.list_(pa.string())),
        ("num_tokens", pa.int32()),
        ("num_trained_tokens", pa.int32()),
        ("n_pass_tokens", pa.int64()),
    ]
)
# v2 adds the loss: per-token weights and the row's share of the step's denominator.
SCHEMA_V2 = SCHEMA_V1.append(pa.field("loss_weights", pa.list_(pa.float32()))).append(
    pa.field("loss_units", pa.int32())
)
# v3: a tree may hold several conversations (shared prefixes); each names its segments.
SCHEMA_V3 = SCHEMA_V2.append(pa.field("conversation_segments", pa.list_(_INT32_LIST)))
# v4: the N-pass samples' attention pairs, which a shared tree does not determine.
SCHEMA = SCHEMA_V3.append(pa.field("n_pass_pairs", pa.int64()))
_SCHEMAS = {1: SCHEMA_V1, 2: SCHEMA_V2, 3: SCHEMA_V3, 4: SCHEMA}


class FormatError(ValueError):
    """Output that cannot be read as format v1 to v4; the message names the file (and row)."""


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def lock_holder(folder: Path) -> dict | None:
    """Who holds the folder's lock ({"pid", "host", "alive"}), or None if it is free.
    `alive` is False only when the holder is known to be gone (same host, no such
    process); a lock from another host may be held."""
    try:
        text = (folder / LOCK).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        text = ""
    return judge_lock(text)


def judge_lock(text: str) -> dict:
    """{"pid", "host", "alive"} of the lock file whose text this is (see `lock_holder`)."""
    try:
        holder = json.loads(text)
    except ValueError:
        holder = {}
    if not isinstance(holder, dict):
        holder = {}
    pid, host = holder.get("pid"), holder.get("host")
    alive = True
    if host == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            alive = False
        except PermissionError:
            pass  # a live process of another user
    return {"pid": pid, "host": host, "alive": alive}


def read_manifest(folder: Path) -> dict:
    """The manifest of a finished run; a folder without one, or one a convert is writing
    (it holds the lock), is not a finished run."""
    holder = lock_holder(folder)
    if holder is not None and holder["alive"]:
        raise FormatError(
            f"{folder}: a convert is writing this folder (pid {holder['pid']} on {holder['host']}); "
            "read it when that run has finished"
        )
    path = folder / MANIFEST
    if not path.is_file():
        raise FormatError(f"{folder}: no {MANIFEST}, so this is not a finished onepass-prep run")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"{path}: not JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: not an onepass-prep manifest")
    if manifest.get("format_version") not in READ_VERSIONS:
        raise FormatError(
            f"{path}: format_version {manifest.get('format_version')!r} is unknown "
            f"(this version reads {', '.join(map(str, READ_VERSIONS))})"
        )
    return manifest


def loss_settings(manifest: dict) -> dict:
    """What the rows' loss weights encode; a v1 run trained every assistant turn, weight 1,
    under the token mean."""
    return manifest.get("loss") or {"normalization": "token", "train_on": "all"}


def listed_shards(folder: Path, manifest: dict) -> list[tuple[Path, int, int]]:
    """(file, rows, tokens) of each shard, in the manifest's order."""
    try:
        return [(folder / e["file"], int(e["rows"]), int(e["tokens"])) for e in manifest["shards"]]
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{folder / MANIFEST}: 'shards' is not a list of file/rows/tokens") from None


def resolve_shards(source: Source) -> list[Path]:
    """Shard files of output folders or of single shards, each checked against its manifest
    (row count, and the columns of the manifest's format version).

    A loose shard is read only if the folder it sits in holds a manifest that lists it,
    because the manifest is the only place that says the run finished and which format it
    wrote.
    """
    items = [source] if isinstance(source, str | Path) else list(source)
    if not items:
        raise FormatError("no shards given")
    files: list[Path] = []
    for item in map(Path, items):
        folder = item if item.is_dir() else item.parent
        manifest = read_manifest(folder)
        listed = {path: rows for path, rows, _ in listed_shards(folder, manifest)}
        if not item.is_dir() and item not in listed:
            raise FormatError(f"{item}: not listed in {folder / MANIFEST}")
        chosen = list(listed) if item.is_dir() else [item]
        for path in chosen:
            open_shard(path, listed[path], manifest["format_version"])
        files.extend(chosen)
    return files


def open_shard(path: Path, rows: int | None = None, version: int | None = None) -> pq.ParquetFile:
    """A shard's Parquet file, checked: it exists, is readable, has `rows` rows (if given)
    and exactly the column types of format `version` (if not given, of the version its
    columns say). A truncated or corrupt file is named, not a bare Arrow error."""
    if not path.is_file():
        raise FormatError(f"{path}: listed in the manifest but missing")
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise FormatError(f"{path}: not a readable Parquet file ({error})") from None
    if rows is not None and parquet.metadata.num_rows != rows:
        raise FormatError(f"{path}: {parquet.metadata.num_rows} rows, the manifest says {rows}")
    schema = parquet.schema_arrow
    if version is None:
        names = ("n_pass_pairs", "conversation_segments", "loss_weights")
        version = next((4 - i for i, name in enumerate(names) if name in schema.names), 1)
    for field in _SCHEMAS[version]:
        if field.name not in schema.names:
            raise FormatError(f"{path}: missing column {field.name!r}")
        if schema.field(field.name).type != field.type:
            raise FormatError(
                f"{path}: column {field.name!r} is {schema.field(field.name).type}, expected {field.type}"
            )
    return parquet


def read_row_group(path: Path, group: int, first_row: int, columns: list[str] | None = None) -> pa.Table:
    try:
        return open_shard(path).read_row_group(group, columns=columns)
    except (OSError, pa.ArrowException) as error:
        raise FormatError(f"{path}: rows from {first_row}: cannot be read ({error})") from None
