"""One-pass training on a CUDA GPU (FlexAttention) against the N-pass expansion, as ratios.

    python benchmarks/gpu.py                      # row lengths 8k, 16k and 32k
    python benchmarks/gpu.py --lengths 8192 --rows 2 --repeats 1    # a quick check

For each row length L: seeded synthetic chats (benchmarks/synth.py) converted with
``--max-seq-len L``; the L-fullest one-pass rows; and the N-pass samples of exactly the
conversations in those rows. A Qwen3-0.6B-shaped model (random weights, bf16) makes one
forward + backward over each arm's whole input:

- one-pass: the rows, ``attn_implementation="flex_attention"``, BlockMask from the hook;
- N-pass: every sample on its own, causal sdpa (the usual way);
- N-pass packed: the samples packed into rows of L tokens with document masking (flex,
  the same BlockMask builder: each sample is a root).

Rows are padded to exactly L (one length per arm, so flex compiles once per L). The output
layer has only the token ids in use (as in run.py's training step): 152k rows of logits
would weigh on every arm alike and hide the attention being compared. Reported: step time
and peak memory against both N-pass arms, the one-pass/N-pass token ratio, the target
(one-pass time <= 1.1 x token ratio x N-pass time), building the BlockMask as a share of
the one-pass step, and N-pass tokens trained per second. Writes --out (JSON) too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synth  # noqa: E402

THINK = ("<think>", "</think>")


def workload(data: Path, length: int, rows: int) -> tuple[list[dict], list[tuple[np.ndarray, int]]]:
    """The ``rows`` fullest one-pass rows at ``--max-seq-len length``, and the trained N-pass
    samples ``(ids, train_start)`` of the conversations they hold."""
    from onepass_prep.convert import ConvertOptions, convert
    from onepass_prep.convert.records import Conversation, read_jsonl
    from onepass_prep.convert.render import Renderer
    from onepass_prep.convert.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as out:
        convert([data], Path(out), ConvertOptions(model="qwen", max_seq_len=length, overwrite=True))
        every = [row for shard in sorted(Path(out).glob("part-*.parquet")) for row in pq.read_table(shard).to_pylist()]
    chosen = sorted(every, key=lambda row: -row["num_tokens"])[:rows]
    wanted = {name for row in chosen for name in row["conversation_ids"]}
    renderer = Renderer(load_tokenizer("qwen").tokenizer, THINK)
    samples = [
        (np.asarray(s.input_ids, np.int64), s.train_start)
        for chat in read_jsonl(data, THINK) if isinstance(chat, Conversation) and chat.id in wanted
        for s in renderer.samples(chat) if s.is_trained
    ]
    expected = sum(int(row["n_pass_tokens"]) for row in chosen)
    if sum(len(ids) for ids, _ in samples) != expected:
        raise SystemExit(f"N-pass samples hold {sum(len(i) for i, _ in samples)} tokens, rows say {expected}")
    return chosen, samples


def packed(samples: list[tuple[np.ndarray, int]], length: int) -> list[dict]:
    """N-pass samples first-fit into rows of at most ``length`` tokens, each a root segment."""
    bins: list[list[tuple[np.ndarray, int]]] = []
    for sample in sorted(samples, key=lambda s: -len(s[0])):
        room = next((b for b in bins if sum(len(s[0]) for s in b) + len(sample[0]) <= length), None)
        if room is None:
            bins.append([sample])
        else:
            room.append(sample)
    rows = []
    for b in bins:
        labels = [np.where(np.arange(len(ids)) < start, -100, ids) for ids, start in b]
        rows.append({
            "input_ids": np.concatenate([ids for ids, _ in b]), "labels": np.concatenate(labels),
            "position_ids": np.concatenate([np.arange(len(ids)) for ids, _ in b]),
            "mask_spec": {"seg_lens": [len(ids) for ids, _ in b], "seg_parents": [-1] * len(b)},
        })
    return rows


def measure(run: Callable[[], None], repeats: int) -> tuple[float, int]:
    """Best wall time of ``repeats`` runs (after one warm-up that compiles) and peak memory."""
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, torch.cuda.max_memory_allocated()


def one_length(data: Path, length: int, rows: int, repeats: int) -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from onepass_prep.torch import OnePassCollator, block_mask, install_mask_hook

    one_rows, samples = workload(data, length, rows)
    used = np.unique(np.concatenate([row["input_ids"] for row in one_rows]))

    def renumber(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        return np.where(ids == -100, -100, np.searchsorted(used, ids))

    for row in one_rows:
        row["input_ids"], row["labels"] = renumber(row["input_ids"]), renumber(row["labels"])
    samples = [(renumber(ids), start) for ids, start in samples]
    torch.manual_seed(0)
    config = Qwen3Config(  # Qwen3-0.6B's shape, the vocabulary in use
        vocab_size=len(used), hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1_000_000, tie_word_embeddings=True,
    )
    model = Qwen3ForCausalLM(config).to("cuda", torch.bfloat16).train()
    collate = OnePassCollator(pad_to_multiple_of=length)
    one_batches = [{k: v.cuda() for k, v in collate([row]).items()} for row in one_rows]
    packed_batches = [{k: v.cuda() for k, v in collate([row]).items()} for row in packed(samples, length)]
    single = [(torch.as_tensor(ids, device="cuda")[None], start) for ids, start in samples]

    def flex(batches: list[dict]) -> Callable[[], None]:
        def run() -> None:
            model.set_attn_implementation("flex_attention")
            handle = install_mask_hook(model)
            for batch in batches:
                model(**batch).loss.backward()
            handle.remove()
            model.zero_grad(set_to_none=True)
        return run

    def causal() -> None:
        model.set_attn_implementation("sdpa")
        for ids, start in single:
            labels = ids.clone()
            labels[:, :start] = -100
            model(input_ids=ids, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)

    def build_masks() -> None:
        for batch in one_batches:
            block_mask(batch["subtree_end"])

    seconds, peak = {}, {}
    for name, run in {"one_pass": flex(one_batches), "n_pass": causal,
                      "n_pass_packed": flex(packed_batches), "mask": build_masks}.items():
        seconds[name], peak[name] = measure(run, repeats)
    del peak["mask"]
    one_tokens = sum(len(row["input_ids"]) for row in one_rows)
    n_tokens = sum(len(ids) for ids, _ in samples)
    tokens = one_tokens / n_tokens
    return {
        "length": length, "rows": len(one_rows), "packed_rows": len(packed_batches),
        "conversations": sum(len(row["conversation_ids"]) for row in one_rows),
        "one_pass_tokens": one_tokens, "n_pass_tokens": n_tokens, "tokens_ratio": tokens,
        "seconds": seconds, "peak_bytes": peak,
        "time_vs_n_pass": seconds["one_pass"] / seconds["n_pass"],
        "time_vs_n_pass_packed": seconds["one_pass"] / seconds["n_pass_packed"],
        "target": seconds["one_pass"] / (tokens * seconds["n_pass"]),
        "memory_vs_n_pass": peak["one_pass"] / peak["n_pass"],
        "memory_vs_n_pass_packed": peak["one_pass"] / peak["n_pass_packed"],
        "mask_share": seconds["mask"] / seconds["one_pass"],
        "n_pass_tokens_per_second": {arm: n_tokens / seconds[arm] for arm in ("one_pass", "n_pass", "n_pass_packed")},
    }


def report(results: list[dict]) -> str:
    lines = [
        "| L | rows (chats) | tokens 1p/Np | time 1p/Np | time 1p/Np packed | target (<= 1.1) "
        "| memory 1p/Np | memory 1p/Np packed | mask build / step | N-pass tokens/s: 1p, Np, Np packed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        rate = r["n_pass_tokens_per_second"]
        lines.append(
            f"| {r['length']} | {r['rows']} ({r['conversations']}) | {r['tokens_ratio']:.2f} "
            f"| {r['time_vs_n_pass']:.2f} | {r['time_vs_n_pass_packed']:.2f} | {r['target']:.2f} "
            f"| {r['memory_vs_n_pass']:.2f} | {r['memory_vs_n_pass_packed']:.2f} | {r['mask_share']:.1%} "
            f"| {rate['one_pass']:,.0f}, {rate['n_pass']:,.0f}, {rate['n_pass_packed']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8192,16384,32768", help="row lengths, comma-separated")
    parser.add_argument("--rows", type=int, default=4, help="one-pass rows per length (the fullest)")
    parser.add_argument("--chats", type=int, default=300, help="synthetic chats converted per length")
    parser.add_argument("--scale", type=float, default=0.25, help="synth.py's text-length scale")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per arm (best is kept)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "gpu_results.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU: torch sees none (torch "
              f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'})", file=sys.stderr)
        raise SystemExit(2)
    import transformers

    machine = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d")}
    print(f"GPU: {machine['gpu']} (torch {machine['torch']}, transformers {machine['transformers']})", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        data = synth.write(Path(folder) / "chats.jsonl", args.chats, seed=1, scale=args.scale)
        for length in map(int, args.lengths.split(",")):
            print(f"L = {length} ...", flush=True)
            results.append(one_length(data, length, args.rows, args.repeats))
    args.out.write_text(json.dumps({"machine": machine, "args": vars(args) | {"out": str(args.out)},
                                    "results": results}, indent=2) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
