"""The benchmark script still runs (tiny sizes) and its numbers hang together. Speed is
judged by docs/benchmarks.md, not here."""

import importlib.util
import json
import subprocess
import sys

from helpers.paths import ROOT


def test_benchmark_quick_run_reports_every_section(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["conversion"]["conversations"] == 20
    assert all(seconds > 0 for seconds in results["conversion"]["seconds"].values())
    assert 0 < results["packing"]["fill_rate"] <= 1
    for row in results["growth"]:
        assert row["n_pass_tokens_per_chat"] >= row["one_pass_tokens_per_chat"]
        assert row["n_pass_pairs_per_chat"] >= row["one_pass_pairs_per_chat"]
    training = results["training_step"]
    assert training["one_pass_tokens"] < training["n_pass_tokens"]
    hybrid = results["hybrid_step"]
    assert hybrid["tokens_one_pass_over_n_pass"] < 1 and hybrid["levels_per_row"] >= 2
    assert [m["conversations"] for m in results["memory"]] == [200, 400]
    assert results["hostile"]["rejected_by_kind"] == {"too-long": 1}
    assert set(results["rendering"]) == {"qwen3", "gpt-oss", "deepseek-v3.1"}
    assert all(r["render_after_vs_before"] > 0 for r in results["rendering"].values())
    assert "| packing fill rate" in done.stdout


def test_report_prints_any_subset_of_sections():
    """`run.py --only X` into a fresh --out holds X's results alone: its report prints
    their table, whichever section X is (the results are the committed full run's)."""
    spec = importlib.util.spec_from_file_location("benchmark_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    full = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    sections = [key for key in full if key not in ("machine", "quick")]
    assert len(sections) >= len(module.SECTIONS.split(","))  # a section may hold several results (hybrid: two models)
    whole = module.report(full)
    for section in sections:
        alone = module.report({"machine": full["machine"], "quick": False, section: full[section]})
        assert alone.startswith("|") and alone.endswith("|"), section
        assert all(line in whole for line in alone.splitlines()), section
