"""Write rows as Parquet shards (docs/FORMAT.md) and the manifest that marks a run complete.

Each file appears whole or not at all (a local one is written under a temporary name and
renamed; an object is one PUT), and the manifest is written last, so an interrupted run
never leaves a file that looks finished.
"""

from __future__ import annotations

import json
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from onepass_prep.convert.pack import Row
from onepass_prep.convert.storage import Location
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
        pa.ListArray.from_arrays(
            pa.array(np.cumsum([0] + [len(row.conversation_segments) for row in rows]), pa.int32()),
            _lists([owned for row in rows for owned in row.conversation_segments]),
        ),
        pa.array([row.n_pass_pairs for row in rows], pa.int64()),
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def write_shard(out_dir: Location, index: int, rows: list[Row]) -> dict:
    """Write shard `index` (every row of one input chunk; none if the chunk converted
    nothing, so shard numbers stay those of the chunks), whole or not at all. The same
    rows give the same bytes, so a chunk written twice (a retried or resumed one) leaves
    the same file."""
    name = shard_name(index)

    def write(handle: IO[bytes]) -> None:
        with pq.ParquetWriter(handle, SCHEMA, compression="zstd") as writer:
            for first in range(0, len(rows), ROW_GROUP_ROWS):
                writer.write_table(rows_to_table(rows[first : first + ROW_GROUP_ROWS]), row_group_size=ROW_GROUP_ROWS)

    (out_dir / name).put(write)
    return {"file": name, "rows": len(rows), "tokens": sum(len(row) for row in rows),
            "unshared": sum(row.unshared_tokens for row in rows)}


def write_manifest(out_dir: Location, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"

    def write(handle: IO[bytes]) -> None:
        handle.write(text.encode("utf-8"))

    (out_dir / MANIFEST).put(write)
