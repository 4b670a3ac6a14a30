"""Map-style and streaming datasets over the shards of a finished run.

Both yield rows shaped as in the Parquet file (``input_ids``, ``labels``, ``position_ids``
as int32 numpy arrays, ``loss_weights`` as a float32 array, ``loss_units`` as an int,
``mask_spec`` as a dict of ``seg_lens`` and ``seg_parents``), so the collator also accepts rows
read by other tools. Format v1 shards read with the loss columns v1 means (weight 1 per
trained token, units = trained tokens). Every row is validated before it is yielded.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from onepass_prep.format import (
    SCHEMA,
    Source,
    list_columns,
    list_parts,
    open_shard,
    read_row_group,
    resolve_shards,
    validate_batch,
    with_loss_columns,
)

Row = dict[str, Any]

_READ = ["input_ids", "position_ids", "labels", "mask_spec", "num_tokens", "num_trained_tokens"]
_LOSS = ["loss_weights", "loss_units"]  # format v2; derived for v1 shards
_KEEP = ["input_ids", "position_ids", "labels", "mask_spec", *_LOSS]
_CACHE_LAYOUT = 2  # in the cache file's name: a copy written with other columns is not reused


class _Rows:
    """Numpy views (zero-copy where Arrow allows) of a batch, sliced into rows on demand."""

    def __init__(self, batch: pa.RecordBatch | pa.Table) -> None:
        self.parts = {name: list_parts(array) for name, array in list_columns(batch).items()}
        self.units = batch.column("loss_units").to_numpy()
        self.num_rows = batch.num_rows

    def __getitem__(self, i: int) -> Row:
        row: Row = {name: values[off[i] : off[i + 1]] for name, (off, values) in self.parts.items()}
        row["loss_units"] = int(self.units[i])
        row["mask_spec"] = {"seg_lens": row.pop("seg_lens"), "seg_parents": row.pop("seg_parents")}
        return row


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onepass_prep"


def arrow_cache(path: Path, cache_dir: Path) -> Path:
    """An uncompressed Arrow IPC copy of a validated shard, built once, memory-mapped after.

    Parquet is compressed, so random access into it decodes whole row groups; the IPC copy
    is read in place through the page cache, which processes on one machine share. The name
    carries the shard's path, size and mtime, so a rewritten shard gets a fresh copy.
    """
    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_CACHE_LAYOUT}"
    key = hashlib.sha256(identity.encode()).hexdigest()
    target = cache_dir / f"{path.stem}-{key[:16]}.arrow"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    shard = open_shard(path)
    first_row = 0
    try:
        with pa.ipc.new_file(tmp, _KEEP_SCHEMA) as out:
            for group in range(shard.num_row_groups):
                table = _read_checked(path, shard.schema_arrow.names, group, first_row)
                first_row += table.num_rows
                out.write_table(table.select(_KEEP).cast(_KEEP_SCHEMA))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


_KEEP_SCHEMA = pa.schema([SCHEMA.field(name) for name in _KEEP])


def _read_checked(path: Path, names: list[str], group: int, first_row: int) -> pa.Table:
    """A row group with the columns the rows need, validated, with the loss columns (derived
    from the labels for a v1 shard, whose columns ``names`` lack them)."""
    table = read_row_group(path, group, first_row, _READ + [c for c in _LOSS if c in names])
    validate_batch(table, path, first_row)
    return with_loss_columns(table)


class OnePassDataset(Dataset):
    """Random access to every row of one or many runs, for samplers and DistributedSampler.

    Shards are validated once while their memory-mapped Arrow copy is built in ``cache_dir``
    (default ``$XDG_CACHE_HOME/onepass_prep``), so a broken row fails at construction.
    """

    def __init__(self, source: Source, cache_dir: str | Path | None = None) -> None:
        self.files = resolve_shards(source)
        root = Path(cache_dir) if cache_dir is not None else _cache_root()
        self._cached = [arrow_cache(path, root) for path in self.files]
        self._blocks: list[_Rows] | None = None
        self._starts: list[int] = []
        self._open()

    def _open(self) -> None:
        blocks: list[_Rows] = []
        for path in self._cached:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            blocks.extend(_Rows(reader.get_batch(i)) for i in range(reader.num_record_batches))
        self._blocks = blocks
        self._starts = np.cumsum([0] + [block.num_rows for block in blocks]).tolist()

    def __getstate__(self) -> dict:
        # DataLoader workers started with spawn re-map the files instead of pickling the data.
        return {**self.__dict__, "_blocks": None}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> Row:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        if self._blocks is None:
            self._open()
        assert self._blocks is not None
        index %= len(self)
        block = bisect.bisect_right(self._starts, index) - 1
        return self._blocks[block][index - self._starts[block]]


class OnePassIterableDataset(IterableDataset):
    """Streams row groups in order, for data larger than a local cache.

    Each epoch, every consumer draws the same seeded order of the epoch's rows: a
    permutation of the row groups, and rows shuffled within each group. Rank ``r`` of ``W``
    takes the contiguous slice ``[r*N//W, (r+1)*N//W)`` of that order, and DataLoader
    worker ``w`` of ``K`` the same cut of its rank's share. So every row is yielded once
    per epoch, and each consumer reads a run of consecutive row groups, only the first and
    last of them in part.

    Every rank yields the same number of rows, ``ceil(N/W)``, and worker ``w`` of every rank
    the same number, so every rank makes the same number of batches and a DDP or FSDP loop
    cannot hang at the end of an epoch: a rank whose slice is a row short ends with a
    padding row (``padding_row``: one token, nothing trained, weights and units 0), which
    changes no loss, gradient or denominator. ``drop_last=True`` instead gives every rank
    ``floor(N/W)`` rows, leaving out the last row of the ranks that have one more (as
    ``DistributedSampler(drop_last=True)`` does).

    ``rank``/``world_size`` default to torch.distributed as initialised when the dataset is
    made, its epoch set, or (without workers) iterated: DataLoader workers do not see it.
    Under ``transformers.Trainer`` (accelerate), pass ``rank=0, world_size=1``: accelerate
    shards iterable datasets itself.
    """

    def __init__(
        self,
        source: Source,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if rank is not None and world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.files = resolve_shards(source)
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.drop_last = drop_last
        self.epoch = 0
        self._units: list[tuple[int, int, int]] = []  # (file, row group, first row in file)
        self._columns: list[list[str]] = []
        sizes = []
        for file_index, path in enumerate(self.files):
            shard = open_shard(path)
            self._columns.append(shard.schema_arrow.names)
            meta = shard.metadata
            first = 0
            for group in range(meta.num_row_groups):
                self._units.append((file_index, group, first))
                sizes.append(meta.row_group(group).num_rows)
                first += sizes[-1]
        self._sizes = np.array(sizes, dtype=np.int64)
        self._distributed = _distributed()

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch's shuffle; call before iterating (DataLoader workers copy the dataset)."""
        self.epoch = epoch
        self._distributed = _distributed() or self._distributed

    def _share(self) -> tuple[int, int, int]:
        """This consumer's slice ``[start, stop)`` of the epoch's row order, and how many
        padding rows follow it."""
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            # DataLoader workers do not see torch.distributed: they use what the dataset
            # saw when it was made or its epoch was set
            rank, world = _distributed() or self._distributed or (0, 1)
        total = int(self._sizes.sum())
        start, stop = rank * total // world, (rank + 1) * total // world
        # every rank's share: its slice, cut or padded to one count
        share = total // world if self.drop_last else -(-total // world)
        real = min(stop - start, share)
        first, last = 0, share  # this consumer's positions in its rank's share
        worker = get_worker_info()
        if worker is not None:
            first, last = worker.id * share // worker.num_workers, (worker.id + 1) * share // worker.num_workers
        padding = last - max(first, real) if last > real else 0
        return start + min(first, real), start + min(last, real), padding

    def __iter__(self) -> Iterator[Row]:
        start, stop, padding = self._share()
        yield from self._rows(start, stop)
        for _ in range(padding):
            yield padding_row()

    def _rows(self, start: int, stop: int) -> Iterator[Row]:
        if start >= stop:
            return
        order = np.arange(len(self._units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        ends = np.cumsum(self._sizes[order])
        first = int(np.searchsorted(ends, start, side="right"))  # the unit holding row `start`
        for position in range(first, len(order)):
            unit = int(order[position])
            unit_start = int(ends[position] - self._sizes[unit])
            if unit_start >= stop:
                break
            file_index, group, first_row = self._units[unit]
            path = self.files[file_index]
            rows = _Rows(_read_checked(path, self._columns[file_index], group, first_row))
            within = np.arange(rows.num_rows)
            if self.shuffle:
                within = np.random.default_rng([self.seed, self.epoch, unit]).permutation(within)
            for i in within[max(start - unit_start, 0) : stop - unit_start]:
                yield rows[int(i)]


def padding_row() -> Row:
    """A row that trains nothing: token 0 (which every vocabulary has; the collator's default
    padding), label -100, weight 0, units 0, one root segment. It evens ranks' counts."""
    tokens = np.zeros(1, np.int32)
    return {
        "input_ids": tokens, "labels": np.full(1, -100, np.int32), "position_ids": tokens.copy(),
        "loss_weights": np.zeros(1, np.float32), "loss_units": 0,
        "mask_spec": {"seg_lens": np.ones(1, np.int32), "seg_parents": np.full(1, -1, np.int32)},
    }


def _distributed() -> tuple[int, int] | None:
    """(rank, world size) of torch.distributed, if it is initialised in this process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None


def max_token_id(files: list[Path]) -> int:
    """The largest token id in the shards."""
    largest = -1
    for path in files:
        column = pq.read_table(path, columns=["input_ids"]).column("input_ids")
        value = pc.max(pc.list_flatten(column)).as_py()
        if value is not None:
            largest = max(largest, value)
    return largest


def check_vocab_size(
    model_or_config: Any, dataset: OnePassDataset | OnePassIterableDataset
) -> None:
    """Warn when the model cannot embed the data's largest token id (wrong model or tokenizer)."""
    if hasattr(model_or_config, "get_input_embeddings"):
        vocab = model_or_config.get_input_embeddings().num_embeddings
    else:
        config = model_or_config
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        vocab = config.vocab_size
    largest = max_token_id(dataset.files)
    if largest >= vocab:
        warnings.warn(
            f"the data holds token id {largest} but the model's vocabulary has {vocab} entries: "
            "was the data converted with this model's tokenizer?",
            stacklevel=2,
        )
