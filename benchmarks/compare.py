"""Convert time of two checkouts of onepass-prep on the same benchmark data, runs
interleaved (this machine is noisy; drifting load then hits both alike):

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/compare.py /tmp/before .      # prints best times and after/before

Each run is a fresh process with PYTHONPATH set to its checkout, so each imports its own
code (the worker processes of --num-proc too).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synth  # noqa: E402

RUN = (
    "import sys, time; from pathlib import Path; "
    "from onepass_prep.convert import ConvertOptions, convert; start = time.perf_counter(); "
    "convert([Path(sys.argv[1])], Path(sys.argv[2]), ConvertOptions(model='qwen', overwrite=True)); "
    "print(time.perf_counter() - start)"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--chats", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    checkouts = {"before": args.before.resolve(), "after": args.after.resolve()}
    best = dict.fromkeys(checkouts, float("inf"))
    with tempfile.TemporaryDirectory() as folder:
        data = synth.write(Path(folder) / "bench.jsonl", args.chats, seed=1)
        for _ in range(args.rounds):
            for name, checkout in checkouts.items():
                done = subprocess.run(
                    [sys.executable, "-c", RUN, str(data), str(Path(folder) / name)],
                    env={**os.environ, "PYTHONPATH": str(checkout)}, cwd=checkout,
                    capture_output=True, text=True, check=True,
                )
                seconds = float(done.stdout.split()[-1])
                best[name] = min(best[name], seconds)
                print(f"{name}: {seconds:.2f} s", flush=True)
    print(f"best: before {best['before']:.2f} s, after {best['after']:.2f} s, "
          f"after/before {best['after'] / best['before']:.2f}")


if __name__ == "__main__":
    main()
