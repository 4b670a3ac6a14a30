"""Round two of reliability: hostile records, a folder two runs want at once, inputs named
two ways, a parent killed under its workers, errors a person can act on."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import synth
from helpers.paths import ROOT
from helpers.processes import Bounded, run_bounded
from helpers.reference import (
    READS,
    contract_samples,
    n_pass_pairs,
    one_pass_pairs,
    reference_tokenizer,
)
from typer.testing import CliRunner

from onepass_prep.cli import app

runner = CliRunner()
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>x</think>ok"}]}
HOSTILE = [
    (b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]}', "bad-unicode"),
    (b'{"messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "too-deep"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 3_500_000},
                              {"role": "assistant", "content": "a"}]}).encode(), "too-long"),
    (json.dumps({"messages": [{"role": "assistant", "content": "hello"}, GOOD["messages"][0],
                              GOOD["messages"][1]]}).encode(), "assistant-first"),
]


def convert(*args: object):
    return runner.invoke(app, ["convert", *map(str, args)])


def command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "onepass_prep.cli", "convert", str(data), "--model", "qwen", "-o", str(out),
            "--records-per-shard", "100", "--max-seq-len", "4096", *extra]


def test_hostile_records_are_rejections_and_the_good_ones_stay_exact(tmp_path):
    good = [dict(GOOD, id=f"good-{n}") for n in range(3)]
    lines = [
        b"\xef\xbb\xbf" + json.dumps(good[0]).encode(),  # a BOM starts the file: accepted
        HOSTILE[0][0], json.dumps(good[1]).encode(), HOSTILE[1][0], HOSTILE[2][0],
        json.dumps(good[2]).encode(), HOSTILE[3][0],
    ]
    data = tmp_path / "hostile.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    result = convert(data, "--model", "qwen", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    rejected = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rejected] == [kind for _, kind in HOSTILE]
    assert "starts with an assistant message" in rejected[-1]["reason"]
    rows = pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pylist()
    assert sorted(i for row in rows for i in row["conversation_ids"]) == ["good-0", "good-1", "good-2"]
    tokenizer = reference_tokenizer()
    expected = sum((n_pass_pairs(contract_samples(r, tokenizer, READS[None])) for r in good), Counter())
    assert sum((one_pass_pairs(row) for row in rows), Counter()) == expected


@pytest.mark.parametrize("hostile, kind", HOSTILE[:2])
def test_strict_exits_3_on_a_hostile_record(tmp_path, hostile, kind):
    data = tmp_path / "in.jsonl"
    data.write_bytes(json.dumps(GOOD).encode() + b"\n" + hostile + b"\n")
    result = convert(data, "--model", "qwen", "-o", tmp_path / "out", "--strict")
    assert result.exit_code == 3, result.output
    assert f"{data}:2:" in result.output


def test_two_runs_on_one_folder_one_refuses_and_the_folder_reconciles(tmp_path):
    data = synth.write(tmp_path / "big.jsonl", 12000, seed=3, turns=2, scale=0.08)  # ~20 s
    with open(data, "ab") as handle:
        handle.write(b"{oops\n" * 5)
    out = tmp_path / "out"
    with Bounded(command(data, out), 480, cwd=ROOT) as first:
        while not list(out.glob("part-*.parquet")):  # it has written something
            assert first.process.poll() is None
            first.check_time()
            time.sleep(0.02)
        for extra in ((), ("--overwrite",), ("--resume",)):
            second = run_bounded(command(data, out, *extra), 120, cwd=ROOT)
            assert first.process.poll() is None, "the first run finished too soon for this test"
            assert second.returncode == 1
            assert f"in use by another convert (pid {first.process.pid} on {socket.gethostname()})" in second.stderr
        reading = runner.invoke(app, ["stats", str(out)])
        assert reading.exit_code == 1 and "a convert is writing this folder" in reading.output
        first.communicate()
    assert first.process.returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    rejected = (out / "rejected.jsonl").read_text().splitlines()
    assert len(rejected) == manifest["counts"]["rejected"] == 5
    stats = json.loads(runner.invoke(app, ["stats", str(out), "--json"]).output)
    assert stats["run"]["read"] == manifest["counts"]["read"] == 12005
    assert not (out / ".onepass-prep.lock").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over_and_said_so(tmp_path, sample_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (out / ".onepass-prep.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    result = convert(sample_path, "--model", "qwen", "-o", out)
    assert result.exit_code == 0, result.output
    assert f"took over the lock left in {out} by pid {pid}" in result.output


def test_resume_refuses_input_edited_in_place_with_its_mtime_restored(tmp_path):
    data = synth.write(tmp_path / "big.jsonl", 1500, seed=4, turns=2, scale=0.08)
    out = tmp_path / "out"
    with Bounded(command(data, out), 180, cwd=ROOT) as child:
        while len(list(out.glob("part-*.parquet"))) < 2:
            assert child.process.poll() is None
            child.check_time()
            time.sleep(0.02)
        child.process.send_signal(signal.SIGINT)
        child.communicate()
    assert child.process.returncode == 130
    stat = data.stat()
    content = bytearray(data.read_bytes())
    content[-20] = ord("X") if content[-20] != ord("X") else ord("Y")  # same size
    data.write_bytes(bytes(content))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    resumed = run_bounded(command(data, out, "--resume"), 120, cwd=ROOT)
    assert resumed.returncode == 1 and "inputs changed since the run began" in resumed.stderr


def test_output_does_not_depend_on_how_the_input_path_is_spelled(tmp_path, sample_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    data = folder / "chats.jsonl"
    data.write_bytes(sample_path.read_bytes() + b"{oops\n")
    monkeypatch.chdir(tmp_path)
    outs = []
    for spelling in (str(data), "data/chats.jsonl", "./data/../data/chats.jsonl"):
        out = tmp_path / f"out{len(outs)}"
        assert convert(spelling, "--model", "qwen", "-o", out).exit_code == 0
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0] == outs[1] == outs[2]
    assert json.loads(outs[0]["rejected.jsonl"])["source"] == "chats.jsonl"


def test_workers_die_with_a_killed_parent(tmp_path):
    data = synth.write(tmp_path / "big.jsonl", 3000, seed=6, turns=2, scale=0.08)
    out = tmp_path / "out"
    with Bounded(command(data, out, "--num-proc", "2"), 180, cwd=ROOT) as child:
        parent = child.process
        while not list(out.glob("part-*.parquet")):
            assert parent.poll() is None
            child.check_time()
            time.sleep(0.02)
        workers = children(parent.pid)
        assert workers, "no worker processes found"
        parent.kill()  # the parent alone: its workers must end by themselves
        parent.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in workers)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.mkdir(), "a folder, but neither a datasets.save_to_disk folder"),
        (lambda p: os.mkfifo(p), "not a regular file"),
        (lambda p: p.write_bytes(b"\x1f\x8b\x08\x00rest"), "looks like gzip-compressed data, but cannot be read"),
        (lambda p: p.write_bytes(b"PK\x03\x04rest"), "looks like a zip archive"),
    ],
    ids=["folder", "fifo", "gzip", "zip"],
)
def test_inputs_that_cannot_be_read_are_refused_in_one_line(tmp_path, make, message):
    path = tmp_path / "input"
    make(path)
    result = convert(path, "--model", "qwen", "-o", tmp_path / "out")
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_run_that_rejects_every_record_exits_non_zero(tmp_path):
    data = tmp_path / "all-bad.jsonl"
    data.write_text("{oops\n" * 3)
    result = convert(data, "--model", "qwen", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "every record was rejected" in result.output


def test_output_that_is_a_file_and_a_tokenizer_that_is_not_a_folder_are_one_line(tmp_path, sample_path):
    file = tmp_path / "file"
    file.write_text("x")
    result = convert(sample_path, "--model", "qwen", "-o", file)
    assert result.exit_code == 1 and result.output.strip() == f"error: output {file}: is a file, not a folder"
    result = convert(sample_path, "--model", str(tmp_path), "-o", tmp_path / "out")
    assert result.exit_code == 1 and "a folder without tokenizer files" in result.output


def test_disk_full_is_one_line_naming_the_cause(tmp_path, sample_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        result = convert(sample_path, "--model", "qwen", "-o", disk / "out")
        assert result.exit_code == 1
        assert "(disk full)" in result.output and len(result.output.strip().splitlines()) == 1
    finally:
        subprocess.run(["umount", str(disk)], check=False)
