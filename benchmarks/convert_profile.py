"""Where a `convert` process spends its time, and its wall time against the floor's, each
a whole process (start-up included) on the conversion benchmark's chats:

    .venv/bin/python benchmarks/convert_profile.py                     # 3,000 chats, best of 3
    .venv/bin/python benchmarks/convert_profile.py --before /tmp/old   # and a checkout's convert, interleaved
    .venv/bin/python benchmarks/convert_profile.py --chats 20 --rounds 1   # checks it runs

The profile is one convert process (and one of the --before checkout's) with each stage
timed on the thread that runs it (wall and thread CPU time) and the CPU time of every
thread of the process read from /proc (the tokenizer's own threads included). The ratio
runs the floor (one `apply_chat_template(tokenize=True)` per chat, as in run.py, but as a
process of its own that reads the JSONL and loads the tokenizer once) and convert as
processes taking turns, best wall time of each, with its CPU time. Prints JSON, and
writes it to --out if given.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synth  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

FLOOR = """
import sys, time
start = time.perf_counter()
from pathlib import Path
from onepass_prep.convert.records import Conversation, read_jsonl
from onepass_prep.convert.render import Renderer
from onepass_prep.convert.tokenizer import load_tokenizer
THINK = ("<think>", "</think>")
tokenizer = load_tokenizer("qwen").tokenizer
renderer = Renderer(tokenizer, THINK)  # only to place reasoning where the template reads it
for chat in read_jsonl(Path(sys.argv[1]), THINK):
    if isinstance(chat, Conversation):
        messages = renderer.template_input(chat)[0]
        tokenizer.apply_chat_template(messages, tools=chat.tools, tokenize=True, return_dict=False)
print(time.perf_counter() - start)
"""

CONVERT = """
import sys, time
start = time.perf_counter()
from pathlib import Path
from onepass_prep.convert import ConvertOptions, convert
convert([Path(sys.argv[1])], Path(sys.argv[2]), ConvertOptions(model="qwen", overwrite=True))
print(time.perf_counter() - start)
"""


def run_process(code: str, checkout: Path, *args: str) -> tuple[float, float, float]:
    """(wall seconds as the process measured itself, wall seconds from outside, CPU seconds
    of the process and its threads)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env={**os.environ, "PYTHONPATH": str(checkout)},
        cwd=checkout, capture_output=True, text=True, check=True,
    )
    outside = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return float(done.stdout.split()[-1]), outside, cpu


def ratios(data: Path, out: Path, rounds: int, before: Path | None) -> dict:
    """Floor and convert (and a checkout's convert) as processes, taking turns."""
    arms = {"floor": (FLOOR, ROOT, [str(data)]), "convert": (CONVERT, ROOT, [str(data), str(out / "after")])}
    if before:
        arms["convert_before"] = (CONVERT, before, [str(data), str(out / "before")])
    best = {name: (float("inf"), float("inf"), 0.0) for name in arms}
    runs: dict[str, list] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, (code, checkout, args) in arms.items():
            measured = run_process(code, checkout, *args)
            runs[name].append(measured)
            print(f"{name}: {measured[1]:.2f} s wall, {measured[2]:.2f} s CPU", file=sys.stderr, flush=True)
            if measured[1] < best[name][1]:
                best[name] = measured
    result: dict = {"runs": runs, "wall": {n: b[1] for n, b in best.items()}, "cpu": {n: b[2] for n, b in best.items()}}
    result["convert_vs_floor"] = best["convert"][1] / best["floor"][1]
    result["convert_cpu_vs_floor_cpu"] = best["convert"][2] / best["floor"][2]
    if before:
        result["before_vs_floor"] = best["convert_before"][1] / best["floor"][1]
        result["before_cpu_vs_floor_cpu"] = best["convert_before"][2] / best["floor"][2]
        result["after_vs_before"] = best["convert"][1] / best["convert_before"][1]
        result["same_bytes"] = same_bytes(out / "after", out / "before")
    return result


def same_bytes(a: Path, b: Path) -> bool:
    """Every output file (shards, rejections, manifest) the same bytes."""
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


PROFILE = """
import json, os, sys, threading, time
from collections import defaultdict
start = time.perf_counter()
from pathlib import Path
from onepass_prep.convert import ConvertOptions, convert, encode, render, run, work
imported = time.perf_counter() - start

stages = defaultdict(lambda: [0.0, 0.0, 0])  # (stage, thread) -> [wall, thread CPU, calls]
names = {}  # native thread id -> thread name

def timed(stage, function):
    def wrapper(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            thread = threading.current_thread()
            names[threading.get_native_id()] = thread.name
            entry = stages[stage, thread.name]
            entry[0] += time.perf_counter() - wall
            entry[1] += time.thread_time() - cpu
            entry[2] += 1
    return wrapper

run.load_tokenizer = timed("load tokenizer", run.load_tokenizer)
work.parse_line = timed("read: parse records", work.parse_line)
render.Renderer.render_many = timed("render", render.Renderer.render_many)
encode.PieceEncoder.encode = timed("tokenize", encode.PieceEncoder.encode)
render.Renderer.tokenize = timed("tokenize and samples", render.Renderer.tokenize)
work._checked_layout = timed("tree: layout", work._checked_layout)
work.shared_trees = timed("tree: share prefixes", work.shared_trees)
work.pack = timed("pack", work.pack)
work.write_shard = timed("write shard", work.write_shard)

# CPU seconds of every thread of this process, read from /proc while they live.
seen = {}
def sample():
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seen[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
done = threading.Event()
def sampler():
    while not done.wait(0.1):
        sample()
threading.Thread(target=sampler, name="profile sampler", daemon=True).start()

begun = time.perf_counter()
convert([Path(sys.argv[1])], Path(sys.argv[2]), ConvertOptions(model="qwen", overwrite=True))
sample()
done.set()
names[threading.main_thread().native_id] = "MainThread"
wall = time.perf_counter() - start
usage = os.times()
threads = defaultdict(float)
for tid, cpu in seen.items():
    threads[names.get(tid, "tokenizer's threads (and other native threads)")] += cpu
print(json.dumps({
    "wall": wall, "imports": imported, "convert_call": time.perf_counter() - begun,
    "process_cpu": usage.user + usage.system,
    "stages": [[stage, thread, *values] for (stage, thread), values in stages.items()],
    "threads_cpu": threads,
}))
"""


def profile(data: Path, out: Path, checkout: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROFILE, str(data), str(out / "profile")], env={**os.environ, "PYTHONPATH": str(checkout)},
        cwd=checkout, capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chats", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, help="a checkout whose convert runs as a third arm")
    parser.add_argument("--data", type=Path, help="benchmark chats already written (synth.write, seed 1)")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data = args.data or synth.write(Path(folder) / "bench.jsonl", args.chats, seed=1)
        result: dict = {"chats": sum(1 for _ in data.open(encoding="utf-8"))}
        before = args.before.resolve() if args.before else None
        if not args.no_profile:
            result["profile"] = profile(data, Path(folder), ROOT)
            if before:
                result["profile_before"] = profile(data, Path(folder), before)
        if args.rounds:
            result["ratios"] = ratios(data, Path(folder), args.rounds, before)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
