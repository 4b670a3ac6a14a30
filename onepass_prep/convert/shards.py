"""Write rows as Parquet shards (docs/FORMAT.md) and the manifest that marks a run complete.

Shards are written under a temporary name and renamed when complete, and the manifest
is written last, so an interrupted run never leaves a file that looks finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from onepass_prep.convert.pack import Row
from onepass_prep.format import MANIFEST, SCHEMA, shard_name

ROW_GROUP_ROWS = 64


def _lists(arrays: list[np.ndarray], dtype: type = np.int32) -> pa.ListArray:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(array) for array in arrays], out=offsets[1:])
    values: np.ndarray = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def rows_to_table(rows: list[Row]) -> pa.Table:
    mask_spec = pa.StructArray.from_arrays(
        [_lists([row.seg_lens for row in rows]), _lists([row.seg_parents for row in rows])],
        names=["seg_lens", "seg_parents"],
    )
    columns = [
        _lists([row.input_ids for row in rows]),
        _lists([row.position_ids for row in rows]),
        _lists([row.labels for row in rows]),
        mask_spec,
        pa.array([row.conversation_ids for row in rows], pa.list_(pa.string())),
        pa.array([len(row) for row in rows], pa.int32()),
        pa.array([row.num_trained for row in rows], pa.int32()),
        pa.array([row.n_pass_tokens for row in rows], pa.int64()),
        _lists([row.loss_weights for row in rows], np.float32),
        pa.array([row.loss_units for row in rows], pa.int32()),
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


class ShardWriter:
    """Cuts a stream of rows into shards of `rows_per_shard` rows.

    `shards` lists shards an earlier, interrupted run completed; `on_shard` hears of each
    shard as soon as it is complete under its final name.
    """

    def __init__(
        self,
        out_dir: Path,
        rows_per_shard: int,
        shards: list[dict] | None = None,
        on_shard: Callable[[list[dict]], None] = lambda _shards: None,
    ):
        self.out_dir = out_dir
        self.rows_per_shard = rows_per_shard
        self.shards: list[dict] = list(shards or [])
        self.on_shard = on_shard
        self._pending: list[Row] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows = self._tokens = 0

    def write(self, row: Row) -> None:
        self._pending.append(row)
        if len(self._pending) >= ROW_GROUP_ROWS or self._rows + len(self._pending) >= self.rows_per_shard:
            self._write_pending()
        if self._rows >= self.rows_per_shard:
            self._finish_shard()

    def close(self) -> list[dict]:
        self._write_pending()
        self._finish_shard()
        return self.shards

    def _temporary_path(self) -> Path:
        return self.out_dir / (shard_name(len(self.shards)) + ".tmp")

    def _write_pending(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._temporary_path(), SCHEMA, compression="zstd")
        self._writer.write_table(rows_to_table(self._pending), row_group_size=ROW_GROUP_ROWS)
        self._rows += len(self._pending)
        self._tokens += sum(len(row) for row in self._pending)
        self._pending = []

    def _finish_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        name = shard_name(len(self.shards))
        os.replace(self._temporary_path(), self.out_dir / name)
        self.shards.append({"file": name, "rows": self._rows, "tokens": self._tokens})
        self._rows = self._tokens = 0
        self.on_shard(self.shards)


def write_manifest(out_dir: Path, manifest: dict) -> None:
    temporary = out_dir / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, out_dir / MANIFEST)
