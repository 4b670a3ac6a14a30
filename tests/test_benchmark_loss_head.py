"""benchmarks/loss_head.py still runs (tiny sizes) and its numbers hang together. Memory and
speed are judged by docs/benchmarks.md, not here."""

import json
import subprocess
import sys

from helpers.paths import ROOT


def test_loss_head_benchmark_quick_run(tmp_path):
    out = tmp_path / "loss_head.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loss_head.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (entry,) = json.loads(out.read_text())["lengths"].values()
    assert 0 < entry["trained"] < entry["tokens"] <= 512
    assert entry["trained_share"] == entry["trained"] / entry["tokens"]
    # both arms trained the same loss on the same row, in processes of their own
    assert entry["loss_difference"] <= 1e-5 * entry["full"]["loss"]
    for arm in ("chunked", "full"):
        assert entry[arm]["peak_bytes"] >= entry[arm]["loaded_bytes"] > 0 and entry[arm]["seconds"] > 0
    assert done.stdout.startswith("| row tokens |")
