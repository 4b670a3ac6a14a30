"""Shared prefixes (docs/benchmarks.md, "Sharing prefixes"): on the three shapes of
synth.py (agent traces, several responses per prompt, branching conversations) and the
conversion benchmark's data, tokens and attention pairs per conversation with and without
sharing, fill rate and conversion time, as ratios measured in one run; and the choices
behind the converter's rule (the minimum shared length, merging shared trained tokens or
branching before them) against a trie over the same token paths, the bound.

    .venv/bin/python benchmarks/sharing.py            # the run behind docs/benchmarks.md
    .venv/bin/python benchmarks/sharing.py --quick    # tiny sizes: checks the script runs

Writes benchmarks/sharing-results.json (or --out) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synth  # noqa: E402

from onepass_prep.convert import ConvertOptions, convert  # noqa: E402
from onepass_prep.convert.pack import pack  # noqa: E402
from onepass_prep.convert.render import Renderer  # noqa: E402
from onepass_prep.convert.share import samples_of, shared_trees  # noqa: E402
from onepass_prep.convert.tokenizer import load_tokenizer  # noqa: E402
from onepass_prep.convert.tree import PrefixTree  # noqa: E402
from onepass_prep.convert.work import Converted, Rules, convert_lines  # noqa: E402

MAX_LEN = 32768
THRESHOLDS = [1, 16, 64, 256, 1024]


def datasets(folder: Path, quick: bool) -> dict[str, Path]:
    scale = 0.1 if quick else 1
    return {
        "agent (4k shared)": synth.write_shape(folder / "agent.jsonl", "agent", int(256 * scale), seed=1),
        "responses (4-8 per prompt)": synth.write_shape(folder / "responses.jsonl", "responses", int(384 * scale), seed=2),
        "branching": synth.write_shape(folder / "branching.jsonl", "branching", int(384 * scale), seed=3),
        "conversion benchmark data": synth.write(folder / "bench.jsonl", int(300 * scale), seed=1),
    }


def run_stats(out: Path) -> dict:
    """Tokens, attention pairs (each token sees its depth + 1 tokens), rows, conversations."""
    table = pq.read_table(sorted(out.glob("part-*.parquet")), columns=["position_ids", "conversation_ids"])
    positions = np.concatenate([np.asarray(p, np.int64) for p in table.column("position_ids").to_pylist()])
    conversations = sum(len(ids) for ids in table.column("conversation_ids").to_pylist())
    manifest = json.loads((out / "manifest.json").read_text())
    return {"tokens": int(len(positions)), "pairs": int((positions + 1).sum()), "rows": table.num_rows,
            "conversations": conversations, "fill_rate": manifest["fill_rate"],
            "n_pass_tokens": manifest["tokens"]["n_pass"]}


def cpu_seconds() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def end_to_end(data: Path, repeats: int) -> dict:
    """convert with and without sharing, taking turns; best wall and CPU time of each (CPU
    time moves less with the machine's other load)."""
    found, seconds = {}, {"shared": float("inf"), "unshared": float("inf")}
    cpu = dict(seconds)
    for _ in range(repeats):
        for arm, share in (("shared", True), ("unshared", False)):
            with tempfile.TemporaryDirectory() as out:
                start, used = time.perf_counter(), cpu_seconds()
                convert([data], Path(out), ConvertOptions(model="qwen", share_prefixes=share, max_seq_len=MAX_LEN))
                seconds[arm] = min(seconds[arm], time.perf_counter() - start)
                cpu[arm] = min(cpu[arm], cpu_seconds() - used)
                found[arm] = run_stats(Path(out))
    shared, unshared = found["shared"], found["unshared"]
    return {
        "shared": shared, "unshared": unshared, "seconds": seconds, "cpu_seconds": cpu,
        "cpu_shared_over_unshared": cpu["shared"] / cpu["unshared"],
        "tokens_ratio": unshared["tokens"] / shared["tokens"],
        "pairs_ratio": unshared["pairs"] / shared["pairs"],
        "time_shared_over_unshared": seconds["shared"] / seconds["unshared"],
    }


def layouts(data: Path) -> list[tuple[str, object]]:
    renderer = Renderer(load_tokenizer("qwen").tokenizer, ("<think>", "</think>"))
    lines = [(data.name, n, raw) for n, raw in enumerate(data.read_bytes().splitlines(keepends=True), 1)]
    rules = Rules(max_seq_len=MAX_LEN, share_prefixes=False)
    return [(r.id, r.layout) for r in convert_lines(lines, renderer, rules) if isinstance(r, Converted)]


def rule_choices(conversations: list) -> dict:
    """Rows, tokens and fill rate for each minimum shared length, merging or branching
    before shared trained tokens; the trie bound (one tree of every conversation, no
    --max-seq-len)."""
    def measure(trees) -> dict:
        rows = pack(trees, MAX_LEN)
        tokens = sum(len(row) for row in rows)
        pairs = sum(int((row.position_ids.astype(np.int64) + 1).sum()) for row in rows)
        return {"tokens": tokens, "pairs": pairs, "rows": len(rows), "fill_rate": tokens / (len(rows) * MAX_LEN)}

    found = {"none": measure([([i], layout) for i, layout in conversations])}
    for merge in (True, False):
        for threshold in THRESHOLDS:
            start = time.perf_counter()
            trees = shared_trees(conversations, MAX_LEN, "token", min_shared=threshold, merge_trained=merge)
            found[f"{'merge' if merge else 'branch'}_{threshold}"] = measure(trees) | {
                "seconds": time.perf_counter() - start}
    trie = PrefixTree(merge_trained=True)
    for _, layout in conversations:
        trie.add(samples_of(layout), "token")
    found["trie_tokens"] = trie.tokens
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "sharing-results.json")
    args = parser.parse_args()
    results: dict = {"quick": args.quick, "max_seq_len": MAX_LEN, "data": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name, data in datasets(Path(folder), args.quick).items():
            print(name, "...", flush=True)
            entry = end_to_end(data, 1 if args.quick else 3)
            entry["rules"] = rule_choices(layouts(data))
            results["data"][name] = entry
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


def report(results: dict) -> str:
    lines = [
        "| data | conversations | tokens per conversation, unshared / shared | ratio | trie bound | "
        "attention pairs per conversation (thousands), unshared / shared | ratio | fill rate, unshared / shared | "
        "convert time, shared / unshared |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, e in results["data"].items():
        s, u, n = e["shared"], e["unshared"], e["shared"]["conversations"]
        bound = e["rules"]["none"]["tokens"] / e["rules"]["trie_tokens"]
        lines.append(
            f"| {name} | {n:,} | {u['tokens'] / n:,.0f} / {s['tokens'] / n:,.0f} | {e['tokens_ratio']:.2f}x | "
            f"{bound:.2f}x | {u['pairs'] / n / 1e3:,.0f} / {s['pairs'] / n / 1e3:,.0f} | {e['pairs_ratio']:.2f}x | "
            f"{u['fill_rate']:.1%} / {s['fill_rate']:.1%} | {e['time_shared_over_unshared']:.2f} |"
        )
    lines += ["", "| data | rule | rows | tokens, vs unshared | fill rate | grouping seconds |", "| --- | --- | --- | --- | --- | --- |"]
    for name, e in results["data"].items():
        rules = e["rules"]
        base = rules["none"]["tokens"]
        for rule, r in rules.items():
            if rule == "trie_tokens":
                continue
            seconds = f"{r['seconds']:.2f}" if "seconds" in r else ""
            lines.append(f"| {name} | {rule} | {r['rows']} | {base / r['tokens']:.3f}x | {r['fill_rate']:.1%} | {seconds} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
