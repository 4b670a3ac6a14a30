"""`--engine ray` on a Ray cluster of two nodes on this machine (`ray start --head` and a
second `ray start --address`, one CPU each), the driver joining it with --ray-address;
inputs and output on S3 (moto's server): the same bytes as the local engine's run of the
same files, with 1 and 2 workers, when a worker is killed mid-run, and after an
interrupted run is resumed; the driver reads no record bytes. One run on local files
starts a Ray of its own. Real processes throughout: the CLI, Ray's workers, signals; each
run has a hard bound (BOUND seconds) past which it fails and its whole session is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.paths import ROOT
from helpers.processes import Bounded, run_bounded
from helpers.stores import BUCKET, OPTIONS, comparable, folder_files, options, s3_files

from onepass_prep.convert import convert, plan, storage

pytest.importorskip("ray")
pytest.importorskip("moto")
BOUND = 300  # seconds for one run, Ray's start-up included


def command(inputs: list[str], out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "onepass_prep.cli", "convert", *inputs, "--model", "qwen", "-o", out,
            *OPTIONS, "--engine", "ray", *extra]


def shards(out: str) -> int:
    return len([name for name in s3_files(out) if name.startswith("part-")])


def ray_run_with_shards(chats, cluster: str, out: str, count: int) -> Bounded:
    """A two-worker run on the cluster, once it has written `count` shards."""
    child = Bounded(command(chats.urls, out, "--num-proc", "2", "--ray-address", cluster), BOUND, cwd=ROOT)
    while shards(out) < count:
        if child.process.poll() is not None:
            child.kill()
            pytest.fail("finished before it could be interrupted")
        child.check_time()
        time.sleep(0.1)
    return child


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ray_on_two_nodes_writes_the_local_engines_bytes(chats, cluster, workers):
    out = f"s3://{BUCKET}/ray-{workers}"
    done = run_bounded(command(chats.urls, out, "--num-proc", workers, "--ray-address", cluster), BOUND, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert comparable(s3_files(out)) == comparable(chats.expected)


def test_ray_on_local_files_starts_its_own_ray(chats, tmp_path):
    out = tmp_path / "out"
    files = [str(path) for path in chats.files]
    done = run_bounded(command(files, str(out), "--num-proc", "2"), BOUND, cwd=ROOT,
                       env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr
    assert folder_files(out) == chats.expected


def ray_workers(endpoint: str) -> list[int]:
    """Pids of the processes running our Ray actors (on either node: they see our S3)."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    pids = [int(line.split()[0]) for line in listing.splitlines() if "ray::ChunkConverter" in line]
    return [pid for pid in pids if endpoint.encode() in _environment(pid)]


def _environment(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def test_a_killed_worker_is_replaced_and_the_bytes_do_not_change(chats, cluster, s3):
    out = f"s3://{BUCKET}/ray-killed"
    with ray_run_with_shards(chats, cluster, out, 1) as child:
        victims = ray_workers(s3["AWS_ENDPOINT_URL"])
        assert victims
        os.kill(victims[0], signal.SIGKILL)
        _, stderr = child.communicate()
    assert child.process.returncode == 0, stderr
    assert comparable(s3_files(out)) == comparable(chats.expected)


def test_an_interrupted_ray_run_resumes_to_the_same_bytes(chats, cluster):
    out = f"s3://{BUCKET}/ray-resumed"
    with ray_run_with_shards(chats, cluster, out, 3) as child:
        child.process.send_signal(signal.SIGINT)
        child.communicate()
    assert child.process.returncode == 130
    assert "manifest.json" not in s3_files(out)
    resumed = command(chats.urls, out, "--num-proc", "2", "--ray-address", cluster, "--resume")
    finished = run_bounded(resumed, BOUND, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr
    assert comparable(s3_files(out)) == comparable(chats.expected)


def test_the_driver_reads_no_record_bytes(chats, cluster, monkeypatch):
    """Counted in this process, the driver: what it fetches from the inputs is their
    heads (4 KB each, and the compressed blocks a zstd head needs) and Parquet footers,
    whatever their size; the workers count the JSONL lines, in blocks (made small here, so
    that chunks start inside blocks), and read the records."""
    monkeypatch.setattr(plan, "STEP", 4 << 10)
    monkeypatch.setattr(plan, "BLOCK", 16 << 10)
    sizes = {path.name: path.stat().st_size for path in chats.files}
    before = storage.bytes_fetched()
    convert(chats.urls, f"s3://{BUCKET}/ray-driver", options(engine="ray", num_proc=2, ray_address=cluster))
    fetched = storage.bytes_fetched() - before
    assert comparable(s3_files(f"s3://{BUCKET}/ray-driver")) == comparable(chats.expected)
    assert sizes["a.jsonl"] > 8 * (16 << 10)  # several blocks, and far more than a head
    footer = 8 + pq.read_metadata(chats.folder / "c.parquet").serialized_size
    allowed = 3 * 4096 + sizes["b.jsonl.zst"] + 2 * footer  # heads, the zstd head's blocks, footers read twice
    assert fetched <= allowed < sizes["a.jsonl"] / 2, (fetched, allowed, sizes)


def test_python_data_is_read_by_the_driver_and_converted_alike(chats, cluster, tmp_path):
    """Data only the driver can read (Python records, standard input) is sent to the
    workers as records: the bytes are still the local engine's."""
    records = [json.loads(line) for line in (chats.folder / "a.jsonl").read_bytes().splitlines()[:60]
               if line.startswith(b"{\"")]
    convert(records, tmp_path / "local", options(records_per_shard=20))
    convert(records, tmp_path / "ray", options(records_per_shard=20, engine="ray", num_proc=2, ray_address=cluster))
    assert folder_files(tmp_path / "ray") == folder_files(tmp_path / "local")
    assert len(folder_files(tmp_path / "ray")) >= 5
