"""The loss head: peak memory and time of a training step (forward + backward) with the
logits of every position (the full-logits path, `forward_loss(..., full_logits=True)`) and
with the chunked head of trained positions only (`forward_loss`'s default), on one row of
real converted data (benchmarks/synth.py chats, Qwen3 template, packed to the row length).

    .venv/bin/python benchmarks/loss_head.py            # docs/benchmarks.md, "The loss head"
    .venv/bin/python benchmarks/loss_head.py --quick    # tiny sizes: checks the script runs

The model has the real Qwen3 vocabulary (151,936, untied head) and a small body (2 layers,
64 wide, tree attention), so that the head dominates as it does at long context. Each arm
runs in a process of its own and reports its peak RSS (VmHWM) and its best step time. The
full-logits arm needs about 2 GB per 1k tokens: it runs once, at the longest length whose
estimate (plus 4 GB of headroom) fits the memory available when it starts; the chunked arm
runs at every length. Writes `benchmarks/loss_head.json` (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synth  # noqa: E402

VOCAB = 151936
HEADROOM = 4 << 30
# Bytes per position and vocabulary entry of the full-logits step: measured 16 GB at 8,192
# positions of a 151,936 vocabulary, about 3.3 float32 copies of the logits.
FULL_BYTES = 13.5


def available_bytes() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) << 10
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def rows_of(length: int, count: int, scale: float, folder: Path) -> dict:
    """The fullest row of synthetic chats converted and packed to ``length`` tokens, collated."""
    import torch

    from onepass_prep.convert import ConvertOptions, convert
    from onepass_prep.torch import OnePassCollator, OnePassDataset

    data = synth.write(folder / f"chats-{length}.jsonl", count, seed=3, scale=scale)
    out = folder / f"out-{length}"
    convert([data], out, ConvertOptions(model="qwen", max_seq_len=length))
    dataset = OnePassDataset(out, cache_dir=folder / "cache")
    row = max((dataset[i] for i in range(len(dataset))), key=lambda r: len(r["input_ids"]))
    batch = OnePassCollator(pad_to_multiple_of=1)([row])
    path = folder / f"row-{length}.pt"
    torch.save(batch, path)
    tokens = int(batch["input_ids"].shape[1])
    trained = int((batch["labels"] != -100).sum())
    return {"path": str(path), "tokens": tokens, "trained": trained, "trained_share": trained / tokens}


def arm(batch_path: str, full: bool, vocab: int, steps: int) -> None:
    """One arm in this process: prints its step times and peak RSS as JSON."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from onepass_prep.torch import forward_loss, install_mask_hook

    torch.backends.mkldnn.enabled = False  # oneDNN re-plans per length (run.py, training)
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        max_position_embeddings=32768,
    )
    model = Qwen3ForCausalLM(config)
    install_mask_hook(model, kind="tree")
    batch = torch.load(batch_path)
    units = batch["loss_units"].sum()
    loaded = _status("VmRSS")
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        loss, _ = forward_loss(model, batch, units, full_logits=full)
        loss.backward()
        seconds.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=False)
    print(json.dumps({"seconds": min(seconds), "loaded_bytes": loaded, "peak_bytes": _status("VmHWM"),
                      "loss": loss.item()}))


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmHWM: this process's own peak RSS)."""
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) << 10
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_arm(row: dict, full: bool, vocab: int, steps: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--arm", row["path"], "--vocab", str(vocab), "--steps", str(steps),
         *(["--full"] if full else [])],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {'full' if full else 'chunked'} arm failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def measure(lengths: list[int], vocab: int, count: int, scale: float, steps: int) -> dict:
    results: dict = {"vocab": vocab, "lengths": {}}
    with tempfile.TemporaryDirectory() as tmp:
        rows = {length: rows_of(length, count, scale, Path(tmp)) for length in lengths}
        full_at = None
        for length in sorted(lengths, reverse=True):  # the full arm once, as long as memory allows
            need = FULL_BYTES * rows[length]["tokens"] * vocab + HEADROOM
            if available_bytes() >= need:
                full_at = length
                break
            print(f"full-logits arm not run at {length}: needs about {need / 2**30:.1f} GiB available, "
                  f"{available_bytes() / 2**30:.1f} GiB are", file=sys.stderr)
        for length in lengths:
            entry = {**rows[length], "chunked": run_arm(rows[length], False, vocab, steps)}
            entry.pop("path")
            if length == full_at:
                entry["full"] = run_arm(rows[length], True, vocab, steps)
                entry["peak_ratio"] = entry["chunked"]["peak_bytes"] / entry["full"]["peak_bytes"]
                entry["time_ratio"] = entry["chunked"]["seconds"] / entry["full"]["seconds"]
                entry["loss_difference"] = abs(entry["chunked"]["loss"] - entry["full"]["loss"])
            results["lengths"][str(length)] = entry
    return results


def report(results: dict) -> str:
    gib = 2**30
    lines = [
        "| row tokens | trained share | peak RSS: full logits | peak RSS: chunked | ratio "
        "| step: full logits | step: chunked | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in results["lengths"].values():
        chunked, full = entry["chunked"], entry.get("full")
        cells = [f"{entry['tokens']:,}", f"{entry['trained_share']:.1%}"]
        cells += [f"{full['peak_bytes'] / gib:.2f} GiB" if full else "not run",
                  f"{chunked['peak_bytes'] / gib:.2f} GiB", f"{entry['peak_ratio']:.3f}" if full else ""]
        cells += [f"{full['seconds']:.1f} s" if full else "not run", f"{chunked['seconds']:.1f} s",
                  f"{entry['time_ratio']:.2f}" if full else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--lengths", default="8192,16384", help="row lengths, comma-separated")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "loss_head.json")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # a collated row: run one arm on it
    parser.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=VOCAB, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        arm(args.arm, args.full, args.vocab, args.steps)
        return
    if args.quick:
        results = measure([512], VOCAB, count=4, scale=0.05, steps=1)
    else:
        results = measure([int(n) for n in args.lengths.split(",")], VOCAB, count=60, scale=1.0, steps=2)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
