"""The loss head under data parallelism: peak memory per rank and step time of a training step
on two gloo ranks (CPU), FSDP2 (``fully_shard`` per layer and the root) and DDP, with the
chunked head (``forward_loss``) against every position's logits (``full_logits=True``).

    .venv/bin/python benchmarks/sharded.py            # docs/benchmarks.md, "The loss head, sharded"
    .venv/bin/python benchmarks/sharded.py --quick    # tiny sizes: checks the script runs

Each rank trains one row of real converted data (loss_head.py's rows: synthetic chats, Qwen3
template, packed to the length) with the model of loss_head.py (the real 151,936-token
vocabulary, untied head, a 2-layer 64-wide body, tree attention), so the head dominates as it
does at long context. Each arm is a launch of its own (two processes); each rank reports its
peak RSS (VmHWM) and its best step time, the arm the larger of the two ranks. A full-logits arm
needs about 2 GB per 1k tokens on each rank: it runs only where twice its estimate (plus 4 GB
of headroom) fits the memory available when it starts, and is reported as not run otherwise.
Writes ``benchmarks/sharded.json`` (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loss_head  # noqa: E402

VOCAB = loss_head.VOCAB
WORLD = 2
WRAPS = ("fsdp2", "ddp")


def rank_arm(rank: int, batch_path: str, wrap: str, full: bool, vocab: int, steps: int, init: str) -> None:
    """One rank of an arm: prints its best step time, peak RSS and loss as JSON."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from onepass_prep.torch import forward_loss, install_mask_hook, step_denominator

    torch.backends.mkldnn.enabled = False  # oneDNN re-plans per length (run.py, training)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(minutes=30))
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        max_position_embeddings=32768,
    )
    model = Qwen3ForCausalLM(config)
    install_mask_hook(model, kind="tree")
    if wrap == "fsdp2":
        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    else:
        wrapped = DistributedDataParallel(model)
    batch = torch.load(batch_path)
    denominator = step_denominator([batch])
    seconds = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        loss, _ = forward_loss(wrapped, batch, denominator, full_logits=full)
        (loss * WORLD).backward()
        seconds.append(time.perf_counter() - start)
        wrapped.zero_grad(set_to_none=False)
    print(json.dumps({"seconds": min(seconds), "peak_bytes": loss_head._status("VmHWM"), "loss": loss.item()}),
          flush=True)
    dist.barrier()
    dist.destroy_process_group()


def run_arm(row: dict, wrap: str, full: bool, vocab: int, steps: int) -> dict:
    """An arm's two ranks, launched together: the larger peak and step time of the two."""
    with tempfile.TemporaryDirectory() as tmp:
        ranks = [
            subprocess.Popen(
                [sys.executable, __file__, "--arm", row["path"], "--wrap", wrap, "--rank", str(rank),
                 "--init", f"file://{tmp}/rendezvous", "--vocab", str(vocab), "--steps", str(steps),
                 *(["--full"] if full else [])],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for rank in range(WORLD)
        ]
        outputs = [rank.communicate() for rank in ranks]
    if any(rank.returncode != 0 for rank in ranks):
        raise RuntimeError(f"the {wrap} {'full' if full else 'chunked'} arm failed:\n{outputs[0][1][-3000:]}")
    reports = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    return {"seconds": max(r["seconds"] for r in reports), "peak_bytes": max(r["peak_bytes"] for r in reports),
            "loss": sum(r["loss"] for r in reports)}


def measure(lengths: list[int], vocab: int, count: int, scale: float, steps: int) -> dict:
    results: dict = {"vocab": vocab, "ranks": WORLD, "lengths": {}}
    with tempfile.TemporaryDirectory() as tmp:
        rows = {length: loss_head.rows_of(length, count, scale, Path(tmp)) for length in lengths}
        for length in lengths:
            entry = {key: value for key, value in rows[length].items() if key != "path"}
            need = WORLD * loss_head.FULL_BYTES * rows[length]["tokens"] * vocab + loss_head.HEADROOM
            for wrap in WRAPS:
                arms = {"chunked": run_arm(rows[length], wrap, False, vocab, steps)}
                if loss_head.available_bytes() >= need:
                    arms["full"] = run_arm(rows[length], wrap, True, vocab, steps)
                    arms["peak_ratio"] = arms["chunked"]["peak_bytes"] / arms["full"]["peak_bytes"]
                    arms["time_ratio"] = arms["chunked"]["seconds"] / arms["full"]["seconds"]
                    arms["loss_difference"] = abs(arms["chunked"]["loss"] - arms["full"]["loss"])
                else:
                    arms["full_not_run"] = (
                        f"needs about {need / 2**30:.1f} GiB available for two ranks, "
                        f"{loss_head.available_bytes() / 2**30:.1f} GiB were"
                    )
                entry[wrap] = arms
            results["lengths"][str(length)] = entry
    return results


def report(results: dict) -> str:
    gib = 2**30
    lines = [
        "| row tokens | ranks | peak RSS per rank: full logits | chunked | ratio | step: full logits "
        "| chunked | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in results["lengths"].values():
        for wrap in WRAPS:
            arms = entry[wrap]
            chunked, full = arms["chunked"], arms.get("full")
            cells = [f"{entry['tokens']:,}", "FSDP2" if wrap == "fsdp2" else "DDP"]
            cells += [f"{full['peak_bytes'] / gib:.2f} GiB" if full else "not run (memory)",
                      f"{chunked['peak_bytes'] / gib:.2f} GiB", f"{arms['peak_ratio']:.3f}" if full else ""]
            cells += [f"{full['seconds']:.1f} s" if full else "not run", f"{chunked['seconds']:.1f} s",
                      f"{arms['time_ratio']:.2f}" if full else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--lengths", default="2048,4096,8192", help="row lengths, comma-separated")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "sharded.json")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # a collated row: run one rank of an arm on it
    parser.add_argument("--wrap", choices=WRAPS, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    parser.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=VOCAB, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        rank_arm(args.rank, args.arm, args.wrap, args.full, args.vocab, args.steps, args.init)
        return
    if args.quick:
        results = measure([512], VOCAB, count=4, scale=0.05, steps=1)
    else:
        results = measure([int(n) for n in args.lengths.split(",")], VOCAB, count=60, scale=1.0, steps=2)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
