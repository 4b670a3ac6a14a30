"""`--engine ray` on a local Ray cluster the run starts (2 CPUs): the same bytes as the
local engine, with 1 and 2 workers, when a worker is killed mid-run, and after an
interrupted run is resumed. Real processes throughout: the CLI, Ray's workers, signals; each run has a hard bound
(BOUND seconds) past which it fails and its whole session is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import synth
from helpers.paths import ROOT
from helpers.processes import Bounded, run_bounded

pytest.importorskip("ray")
BOUND = 300  # seconds for one run, Ray's start-up included


def command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "onepass_prep.cli", "convert", str(data), "--model", "qwen", "-o", str(out),
            "--records-per-shard", "40", "--max-seq-len", "4096", *extra]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """An input with a rejection in every chunk and conversations that share prefixes,
    converted by the local engine."""
    folder = tmp_path_factory.mktemp("ray")
    data = synth.write_mixed(folder / "chats.jsonl", 400, seed=8, turns=2, scale=0.08)
    lines = data.read_bytes().splitlines(keepends=True)
    data.write_bytes(b"".join(b"{oops\n" + line if i % 37 == 0 else line for i, line in enumerate(lines)))
    out = folder / "local"
    assert run_bounded(command(data, out), BOUND, cwd=ROOT).returncode == 0
    return data, folder_bytes(out)


def ray_run_with_shards(data: Path, out: Path, count: int) -> Bounded:
    """A two-worker Ray run, once it has written `count` shards."""
    child = Bounded(command(data, out, "--engine", "ray", "--num-proc", "2"), BOUND, cwd=ROOT)
    while len(list(out.glob("part-*.parquet"))) < count:
        if child.process.poll() is not None:
            child.kill()
            pytest.fail("finished before it could be interrupted")
        child.check_time()
        time.sleep(0.05)
    return child


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ray_writes_the_local_engines_bytes(local, tmp_path, workers):
    data, expected = local
    out = tmp_path / "out"
    done = run_bounded(command(data, out, "--engine", "ray", "--num-proc", workers), BOUND, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert folder_bytes(out) == expected
    assert len(expected) > 10  # many shards, the manifest and rejected.jsonl
    tokens = json.loads(expected["manifest.json"])["tokens"]
    assert tokens["one_pass"] < 0.9 * tokens["unshared"]  # conversations did share trees


def ray_workers() -> list[int]:
    """Pids of the processes running our Ray actors."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[0]) for line in listing.splitlines() if "ray::ChunkConverter" in line]


def test_a_killed_worker_is_replaced_and_the_bytes_do_not_change(local, tmp_path):
    data, expected = local
    out = tmp_path / "out"
    with ray_run_with_shards(data, out, 1) as child:
        victims = ray_workers()
        assert victims
        os.kill(victims[0], signal.SIGKILL)
        _, stderr = child.communicate()
    assert child.process.returncode == 0, stderr
    assert folder_bytes(out) == expected


def test_an_interrupted_ray_run_resumes_to_the_same_bytes(local, tmp_path):
    data, expected = local
    out = tmp_path / "out"
    with ray_run_with_shards(data, out, 3) as child:
        child.process.send_signal(signal.SIGINT)
        child.communicate()
    assert child.process.returncode == 130
    assert not (out / "manifest.json").exists()
    finished = run_bounded(command(data, out, "--engine", "ray", "--num-proc", "2", "--resume"), BOUND, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr
    assert folder_bytes(out) == expected
