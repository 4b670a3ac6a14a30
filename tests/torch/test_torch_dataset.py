"""Map-style and streaming datasets: every row, once, in a seeded per-epoch order."""

from __future__ import annotations

import json
import os
import pickle
import sys
import textwrap
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers.paths import ROOT, TESTS
from helpers.processes import run_bounded
from helpers.torch_rows import random_row, write_run
from torch.utils.data import DataLoader

from onepass_prep.torch import OnePassCollator, OnePassDataset, OnePassIterableDataset
from onepass_prep.torch.dataset import padding_row

PADDING = padding_row()

ROWS = 40


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """40 rows in 4 shards of 10, row groups of 3: 16 row groups of uneven size."""
    rng = np.random.default_rng(0)
    rows = [random_row(rng, int(rng.integers(1, 12)), weighted=True) for _ in range(ROWS)]
    folder = tmp_path_factory.mktemp("data") / "run"
    return write_run(folder, rows, rows_per_shard=10, rows_per_group=3), rows


PAD = "padding"


def key(row: dict) -> tuple[int, ...] | str:
    """The row's tokens, or PAD for the streaming dataset's padding row."""
    columns = ("input_ids", "labels", "position_ids", "loss_weights")
    if row["loss_units"] == 0 and all(np.array_equal(row[k], PADDING[k]) for k in columns):
        return PAD
    return tuple(int(t) for t in row["input_ids"])


def real(keys: list) -> list:
    return [k for k in keys if k != PAD]


def same_row(got: dict, want: dict) -> bool:
    spec = got["mask_spec"]
    return (
        all(list(got[k]) == want[k] for k in ("input_ids", "labels", "position_ids"))
        and list(spec["seg_lens"]) == want["mask_spec"]["seg_lens"]
        and list(spec["seg_parents"]) == want["mask_spec"]["seg_parents"]
        and list(got["loss_weights"]) == want["loss_weights"]
        and got["loss_units"] == want["loss_units"]
    )


def test_map_dataset_reads_every_row_in_order(run, tmp_path: Path) -> None:
    folder, rows = run
    dataset = OnePassDataset(folder, cache_dir=tmp_path)
    assert len(dataset) == ROWS
    assert all(same_row(dataset[i], rows[i]) for i in range(ROWS))
    assert same_row(dataset[-1], rows[-1])
    with pytest.raises(IndexError):
        dataset[ROWS]
    assert dataset[0]["input_ids"].dtype == np.int32


def test_map_dataset_cache_is_built_once_and_survives_pickling(run, tmp_path: Path) -> None:
    folder, rows = run
    OnePassDataset(folder, cache_dir=tmp_path)
    cached = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.arrow")}
    assert len(cached) == 4
    again = pickle.loads(pickle.dumps(OnePassDataset(folder, cache_dir=tmp_path)))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.arrow")} == cached
    assert same_row(again[17], rows[17])


def test_map_dataset_over_shard_list_and_workers(run, tmp_path: Path) -> None:
    folder, rows = run
    shards = [folder / "part-00003.parquet", folder / "part-00001.parquet"]
    dataset = OnePassDataset(shards, cache_dir=tmp_path)
    assert [key(dataset[i]) for i in range(20)] == [key(r) for r in rows[30:40] + rows[10:20]]
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=OnePassCollator())
    batches = list(loader)
    assert sum(int((b["labels"] != -100).sum()) for b in batches) == sum(
        r["num_trained_tokens"] for r in rows[10:20] + rows[30:40]
    )


def stream(folder: Path, rank: int, epoch: int, seed: int = 7) -> list[tuple[int, ...]]:
    dataset = OnePassIterableDataset(folder, seed=seed, rank=rank, world_size=2)
    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    return [key(row) for row in loader]


def test_stream_sees_every_row_once_per_epoch_across_ranks_and_workers(run) -> None:
    folder, rows = run
    orders = {}
    for epoch in (0, 1):
        per_rank = [stream(folder, rank, epoch) for rank in (0, 1)]
        assert Counter(per_rank[0] + per_rank[1]) == Counter(key(r) for r in rows)
        assert per_rank[0] and per_rank[1]
        orders[epoch] = per_rank
    assert orders[0] != orders[1], "each epoch shuffles differently"
    assert stream(folder, 0, 1) == orders[1][0], "same seed and epoch, same order"
    assert stream(folder, 0, 1, seed=8) != orders[1][0]


def test_stream_without_shuffle_and_single_consumer_is_file_order(run) -> None:
    folder, rows = run
    dataset = OnePassIterableDataset(folder, shuffle=False)
    assert [key(r) for r in dataset] == [key(r) for r in rows]
    assert all(same_row(got, want) for got, want in zip(dataset, rows, strict=True))


def test_stream_takes_rank_from_torch_distributed(run, tmp_path: Path) -> None:
    folder, rows = run
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        assert Counter(key(r) for r in OnePassIterableDataset(folder)) == Counter(key(r) for r in rows)
    finally:
        torch.distributed.destroy_process_group()


def test_stream_rank_arguments_are_checked(run) -> None:
    folder, _ = run
    with pytest.raises(ValueError, match="both"):
        OnePassIterableDataset(folder, rank=1)
    with pytest.raises(ValueError, match="not in"):
        OnePassIterableDataset(folder, rank=2, world_size=2)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """41 rows (no world size of 2-4 divides it) in shards of 11 with row groups of 4:
    groups of 4, 4, 3 and a last shard of 4, 4."""
    rng = np.random.default_rng(1)
    rows = [random_row(rng, int(rng.integers(1, 12)), weighted=True) for _ in range(41)]
    return write_run(tmp_path_factory.mktemp("uneven") / "run", rows, rows_per_shard=11, rows_per_group=4)


def shares(folder: Path, seed: int, world: int, workers: int, monkeypatch) -> tuple[list[list[list]], list]:
    """Each rank's rows per worker, as keys, and the row groups each consumer read (in
    consumer order), with DataLoader workers stood in for by their `get_worker_info`."""
    from onepass_prep.torch import dataset as module

    read = []
    real_read = module._read_checked

    def recording(path, names, group, first_row):
        read.append((path.name, group))
        return real_read(path, names, group, first_row)

    monkeypatch.setattr(module, "_read_checked", recording)
    result = []
    for rank in range(world):
        per_worker = []
        for worker in range(max(workers, 1)):
            info = None if workers == 0 else SimpleNamespace(id=worker, num_workers=workers)
            monkeypatch.setattr(module, "get_worker_info", lambda info=info: info)
            dataset = OnePassIterableDataset(folder, seed=seed, rank=rank, world_size=world)
            dataset.set_epoch(3)
            per_worker.append([key(row) for row in dataset])
        result.append(per_worker)
    monkeypatch.undo()
    return result, read


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_stream_gives_every_rank_and_worker_an_equal_share(uneven, seed, monkeypatch) -> None:
    """World sizes 1-4 with 0-3 workers: the consumers' rows, in consumer order, are the
    one-consumer epoch order (every row once, reproducible); every rank the same count, its
    workers' counts differing by at most one, alike on every rank; each consumer reads a run
    of consecutive row groups."""
    (whole,), _ = shares(uneven, seed, 1, 0, monkeypatch)
    whole_rows = whole[0]
    groups = sum(pq.ParquetFile(path).num_row_groups for path in uneven.glob("*.parquet"))
    for world in (1, 2, 3, 4):
        for workers in (0, 1, 2, 3):
            ranks, read = shares(uneven, seed, world, workers, monkeypatch)
            assert real([row for rank in ranks for worker in rank for row in worker]) == whole_rows
            # every rank ceil(41 / world) rows, split alike over its workers: padding rows at
            # the end of the ranks that are a row short
            assert len({tuple(map(len, rank)) for rank in ranks}) == 1, ranks
            assert sum(map(len, ranks[0])) == -(-41 // world)
            for rank in ranks:
                assert max(map(len, rank)) - min(map(len, rank)) <= 1
                assert PAD not in [row for worker in rank for row in worker][: len(real(sum(rank, [])))]
            # consecutive runs: read in consumer order, a group repeats only where one
            # consumer's run ends and the next one's begins
            runs = [group for n, group in enumerate(read) if n == 0 or read[n - 1] != group]
            assert len(runs) == len(set(runs)) == groups
    assert shares(uneven, seed, 1, 0, monkeypatch)[0][0][0] == whole_rows, "reproducible"


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, list[dict]]]:
    """Runs of 1 to 13 weighted rows, row groups of 2."""
    rng = np.random.default_rng(2)
    runs = {}
    for count in range(1, 14):
        rows = [random_row(rng, int(rng.integers(1, 6)), weighted=True) for _ in range(count)]
        runs[count] = write_run(tmp_path_factory.mktemp(f"rows{count}") / "run", rows, 5, 2), rows
    return runs


def batches_per_rank(folder: Path, world: int, workers: int, batch_size: int, drop_last: bool,
                     monkeypatch) -> tuple[list[int], list[list[dict]]]:
    """How many batches each rank's DataLoader makes (each worker batches its own rows), and
    each rank's rows, with workers stood in for by their `get_worker_info`."""
    from onepass_prep.torch import dataset as module

    steps, rows = [], []
    for rank in range(world):
        count, mine = 0, []
        for worker in range(max(workers, 1)):
            info = None if workers == 0 else SimpleNamespace(id=worker, num_workers=workers)
            monkeypatch.setattr(module, "get_worker_info", lambda info=info: info)
            got = list(OnePassIterableDataset(folder, seed=1, rank=rank, world_size=world, drop_last=drop_last))
            count += -(-len(got) // batch_size)
            mine += got
        steps.append(count)
        rows.append(mine)
    monkeypatch.undo()
    return steps, rows


@pytest.mark.parametrize("drop_last", [False, True])
def test_stream_every_rank_takes_the_same_steps_for_any_row_count(small_runs, drop_last, monkeypatch) -> None:
    """1 to 13 rows over 2 ranks with 0, 1 or 2 workers, batches of 1 and 2: every rank makes
    the same number of batches; padded, every row's units are counted exactly once in the
    epoch (padding rows add none) and the ranks' rows are every row once; drop_last, no
    padding and every rank floor(N/2) rows, none twice."""
    for count, (folder, rows) in small_runs.items():
        everything = Counter(key(row) for row in rows)
        for workers in (0, 1, 2):
            for batch_size in (1, 2):
                steps, ranks = batches_per_rank(folder, 2, workers, batch_size, drop_last, monkeypatch)
                assert steps[0] == steps[1], (count, workers, batch_size, steps)
                assert steps[0] > 0 or (drop_last and count == 1)
                got = [row for rank in ranks for row in rank]
                units = sum(row["loss_units"] for row in got)
                if drop_last:
                    assert [len(rank) for rank in ranks] == [count // 2] * 2
                    assert PAD not in map(key, got) and max(Counter(map(key, got)).values(), default=1) == 1
                else:
                    assert [len(rank) for rank in ranks] == [-(-count // 2)] * 2
                    assert Counter(real([key(row) for row in got])) == everything
                    assert units == sum(row["loss_units"] for row in rows)


def test_map_dataset_with_distributed_sampler_repeats_rows_to_even_ranks(small_runs, tmp_path: Path) -> None:
    """DistributedSampler gives every rank the same count too, but by repeating rows from the
    start of the epoch's order: their units count twice in the epoch (docs/training.md), unless
    drop_last leaves the tail out."""
    from torch.utils.data import DistributedSampler

    for count in (1, 5, 13):
        dataset = OnePassDataset(small_runs[count][0], cache_dir=tmp_path)
        for drop_last in (False, True):
            samplers = [DistributedSampler(dataset, 2, rank, shuffle=False, drop_last=drop_last) for rank in (0, 1)]
            indices = [list(sampler) for sampler in samplers]
            assert len(indices[0]) == len(indices[1]) == (count // 2 if drop_last else -(-count // 2))
            repeated = len(indices[0] + indices[1]) - len(set(indices[0] + indices[1]))
            assert repeated == (0 if drop_last else count % 2)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_stream_workers_in_a_dataloader_split_a_rank_evenly(uneven) -> None:
    """Real DataLoader workers (3 per rank, 3 ranks): every row once, equal shares (41 rows:
    one padding row on a rank)."""
    counts, seen = [], Counter()
    for rank in range(3):
        dataset = OnePassIterableDataset(uneven, seed=5, rank=rank, world_size=3)
        got = [key(row) for row in DataLoader(dataset, batch_size=None, num_workers=3)]
        counts.append(len(got))
        seen.update(got)
    everything = Counter(key(row) for row in OnePassIterableDataset(uneven, shuffle=False))
    assert seen == everything + Counter({PAD: 1}) and counts == [14, 14, 14]


DDP_STREAM = textwrap.dedent(
    """
    import datetime
    import faulthandler
    import json
    import os
    import signal
    import sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader
    from onepass_prep.torch import OnePassCollator

    COLLATE = OnePassCollator(pad_to_multiple_of=16)

    def keyed(rows):  # the batch, and its rows to check that every row came once
        return COLLATE(rows), [[row["input_ids"].tolist(), int(row["loss_units"])] for row in rows]

    def run(rank, world, init, odd, out):
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # where it hangs, if it does
        torch.set_num_threads(1)
        torch.backends.mkldnn.enabled = False  # it re-plans every new sequence length
        from helpers.torch_models import tiny_model
        from onepass_prep.torch import (
            OnePassIterableDataset, forward_loss, install_mask_hook, step_denominator,
        )
        # a collective that cannot complete fails in a minute, with the reason
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        seen = {}
        # a plain loop, an all-reduced denominator per step, 41 rows (a padding row on one
        # rank), under DDP and under FSDP2
        for name, wrap in (("ddp", "ddp"), ("fsdp", "fsdp")):
            model = tiny_model("qwen3", "sdpa")
            install_mask_hook(model)
            if wrap == "ddp":
                model = DistributedDataParallel(model)
            else:
                for layer in model.model.layers:
                    fully_shard(layer)
                fully_shard(model)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            dataset = OnePassIterableDataset(odd, seed=3)  # rank and world from dist
            dataset.set_epoch(1)
            loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=keyed)
            seen[name] = []
            for batch, keys in loader:
                denominator = step_denominator([batch])
                (forward_loss(model, batch, denominator)[0] * world).backward()
                optimizer.step()
                optimizer.zero_grad()
                seen[name] += keys
        with open(f"{out}/{rank}.json", "w") as file:
            json.dump(seen, file)
        dist.barrier()
        dist.destroy_process_group()
        # exit without freeing DDP, which can block in the gloo teardown (see the DDP test
        # of test_torch_weighted.py)
        sys.stderr.flush()
        os._exit(0)

    if __name__ == "__main__":
        mp.spawn(run, args=(2, *sys.argv[1:]), nprocs=2)
    """
)


def test_ddp_and_fsdp2_plain_loops_stream_a_whole_epoch(uneven, tmp_path: Path) -> None:
    """Two gloo ranks, two DataLoader workers each, a plain loop with a collective every step
    (step_denominator) over the streaming dataset for one epoch, under DDP and FSDP2: every
    row once, every row's units once, equal steps (41 rows: a padding row, units 0, on one
    rank); a rank left waiting would fail the run at its bound."""
    script = tmp_path / "ddp_stream.py"
    script.write_text(DDP_STREAM)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [TESTS, ROOT]))}
    done = run_bounded(
        [sys.executable, str(script), f"file://{tmp_path / 'rendezvous'}", str(uneven), str(tmp_path)],
        240, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    rows = list(OnePassIterableDataset(uneven, shuffle=False))
    want = Counter(key(row) for row in rows)
    for name in ("ddp", "fsdp"):
        got = [[tuple(tokens) for tokens, _ in ranks[name]] for ranks in seen]
        units = [sum(u for _, u in ranks[name]) for ranks in seen]
        assert Counter(got[0] + got[1]) == want + Counter({(0,): 1}), name
        assert len(got[0]) == len(got[1]) == 21
        assert sum(units) == sum(row["loss_units"] for row in rows)
