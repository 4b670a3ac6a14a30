"""All onepass-prep benchmarks in one run, reported as ratios against baselines measured
in the same run (this machine is noisy; absolute seconds mean little).

    .venv/bin/python benchmarks/run.py            # the full run behind docs/benchmarks.md
    .venv/bin/python benchmarks/run.py --quick    # tiny sizes: checks the script still works

Writes `benchmarks/results.json` (or the --out path) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synth  # noqa: E402

from onepass_prep.convert import ConvertOptions, convert  # noqa: E402
from onepass_prep.convert.records import Conversation, read_jsonl  # noqa: E402
from onepass_prep.convert.render import ENGINE_VARIABLE, Renderer  # noqa: E402
from onepass_prep.convert.tokenizer import load_tokenizer, qwen_tokenizer_dir  # noqa: E402
from onepass_prep.convert.work import Rules, layout_conversation  # noqa: E402

THINK = ("<think>", "</think>")
TEMPLATES = Path(__file__).resolve().parents[1] / "tests" / "templates"
# Templates whose rendering is measured apart, with the kwargs of their reasoning mode
# (None: the model's own, Qwen3).
RENDER_TEMPLATES = {
    "qwen3": (None, {}),
    "gpt-oss": (TEMPLATES / "gpt-oss.jinja", {}),
    "deepseek-v3.1": (TEMPLATES / "deepseek-v3.1.jinja", {"thinking": True}),
}
SECTIONS = "conversion,rendering,packing,growth,training,hybrid,memory,hostile,engines"


def timed(function, repeats: int = 1) -> float:
    """Best of `repeats` wall-clock runs: the least disturbed by other load."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def interleaved(arms: dict, rounds: int) -> dict:
    """Best wall time of each arm, and its CPU time in that run; the arms take turns so
    that drifting load on the machine hits them alike."""
    best = {name: (float("inf"), 0.0) for name in arms}
    for _ in range(rounds):
        for name, function in arms.items():
            wall, cpu = time.perf_counter(), cpu_seconds()
            function()
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            if wall < best[name][0]:
                best[name] = (wall, cpu)
    return best


def conversion(data: Path, repeats: int) -> dict:
    """convert (1 and 2 processes) vs one render+tokenize per chat vs the obvious N-pass."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))
    renderer = Renderer(load_tokenizer("qwen").tokenizer, THINK)
    chats = [
        (renderer.template_input(c)[0], c.tools) for c in read_jsonl(data, THINK) if isinstance(c, Conversation)
    ]

    def floor():
        for messages, tools in chats:
            tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False)

    def obvious():
        for messages, tools in chats:
            for i, message in enumerate(messages):
                if message["role"] == "assistant":
                    tokenizer.apply_chat_template(messages[: i + 1], tools=tools, tokenize=True, return_dict=False)
                    tokenizer.apply_chat_template(
                        messages[:i], tools=tools, tokenize=True, add_generation_prompt=True, return_dict=False
                    )

    def run_convert(num_proc: int, source: Path = data):
        with tempfile.TemporaryDirectory() as out:
            convert([source], Path(out), ConvertOptions(model="qwen", num_proc=num_proc))

    # Start-up (loading the tokenizer; spawning and loading workers), measured on one chat,
    # is paid once per run; the steady ratios leave it out.
    one_chat = data.with_name("one.jsonl")
    one_chat.write_text(data.read_text(encoding="utf-8").split("\n", 1)[0] + "\n", encoding="utf-8")
    best = interleaved(
        {
            "floor": floor,
            "convert_1": lambda: run_convert(1),
            "convert_2": lambda: run_convert(2),
            "startup_1": lambda: run_convert(1, one_chat),
            "startup_2": lambda: run_convert(2, one_chat),
        },
        repeats,
    )
    seconds = {name: wall for name, (wall, _) in best.items()}
    cpu = {name: used for name, (_, used) in best.items()}
    seconds["obvious_n_pass"] = timed(obvious, 1)
    steady_1 = seconds["convert_1"] - seconds["startup_1"]
    steady_2 = seconds["convert_2"] - seconds["startup_2"]
    return {
        "conversations": len(chats),
        "seconds": seconds,
        "convert_1_vs_floor": seconds["floor"] / seconds["convert_1"],
        "convert_2_vs_floor": seconds["floor"] / seconds["convert_2"],
        "convert_2_vs_convert_1": seconds["convert_1"] / seconds["convert_2"],
        "steady_1_vs_floor": seconds["floor"] / steady_1,
        "steady_2_vs_floor": seconds["floor"] / steady_2,
        "steady_2_vs_steady_1": steady_1 / steady_2,
        "cpu_seconds": cpu,
        "convert_1_cores_busy": cpu["convert_1"] / seconds["convert_1"],
        "convert_2_cores_busy": cpu["convert_2"] / seconds["convert_2"],
        "convert_1_vs_obvious": seconds["obvious_n_pass"] / seconds["convert_1"],
        "obvious_cost_in_floors": seconds["obvious_n_pass"] / seconds["floor"],
    }


class forced_engine:
    """Within it, Renderers made use transformers' apply_chat_template (the "before" arm)."""

    def __enter__(self) -> None:
        os.environ[ENGINE_VARIABLE] = "transformers"

    def __exit__(self, *_: object) -> None:
        os.environ.pop(ENGINE_VARIABLE, None)


def rendering(data: Path, rounds: int) -> dict:
    """Per template: convert (1 process) vs the floor, with the fast rendering path (after)
    and with transformers' apply_chat_template forced (before), and the share of each
    convert's time its rendering alone takes (renderer.render_many on the same chats)."""
    return {
        name: rendering_arms(data, template, kwargs, rounds) for name, (template, kwargs) in RENDER_TEMPLATES.items()
    }


def rendering_arms(data: Path, template: Path | None, kwargs: dict, rounds: int) -> dict:
    tokenizer = load_tokenizer("qwen", template.read_text(encoding="utf-8") if template else None).tokenizer
    fast = Renderer(tokenizer, THINK, kwargs)
    with forced_engine():
        before = Renderer(tokenizer, THINK, kwargs)
    assert fast.engine is not None and before.engine is None, fast.fallback_reason
    # The chats the template renders (some refuse tool-call arguments given as objects), so
    # that every arm does the same work.
    lines = data.read_text(encoding="utf-8").splitlines(keepends=True)
    every = [c for c in read_jsonl(data, THINK) if isinstance(c, Conversation)]  # synth writes no bad line
    kept = [line for line, turns in zip(lines, fast.render_many(every), strict=True) if isinstance(turns, list)]
    data = data.with_name(f"{data.stem}-{template.stem if template else 'own'}.jsonl")
    data.write_text("".join(kept), encoding="utf-8")
    conversations = [c for c in read_jsonl(data, THINK) if isinstance(c, Conversation)]
    chats = [(*fast.template_input(c)[::2], c.tools) for c in conversations]

    def floor() -> None:  # one plain render+tokenize per chat, with its tools
        for messages, merged, tools in chats:
            tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False, **merged)  # type: ignore[arg-type]

    def run_convert(forced: bool) -> None:
        options = ConvertOptions(model="qwen", chat_template=template, chat_template_kwargs=kwargs)
        with tempfile.TemporaryDirectory() as out:
            if forced:
                with forced_engine():
                    convert([data], Path(out), options)
            else:
                convert([data], Path(out), options)

    best = interleaved(
        {
            "floor": floor,
            "convert_after": lambda: run_convert(False),
            "convert_before": lambda: run_convert(True),
            "render_after": lambda: fast.render_many(conversations),
            "render_before": lambda: before.render_many(conversations),
        },
        rounds,
    )
    seconds = {arm: wall for arm, (wall, _) in best.items()}
    return {
        "conversations": len(conversations),
        "seconds": seconds,
        "cpu_seconds": {arm: used for arm, (_, used) in best.items()},
        "convert_vs_floor_after": seconds["floor"] / seconds["convert_after"],
        "convert_vs_floor_before": seconds["floor"] / seconds["convert_before"],
        "convert_after_vs_before": seconds["convert_before"] / seconds["convert_after"],
        "render_after_vs_before": seconds["render_before"] / seconds["render_after"],
        "render_share_after": seconds["render_after"] / seconds["convert_after"],
        "render_share_before": seconds["render_before"] / seconds["convert_before"],
    }


def growth(per_turn_count: int, max_turns: int) -> list[dict]:
    """Training tokens and visible (q, kv) pairs, one-pass vs N-pass, by number of turns."""
    renderer = Renderer(load_tokenizer("qwen").tokenizer, THINK)
    results = []
    for turns in range(1, max_turns + 1):
        one_tokens = one_pairs = n_tokens = n_pairs = 0
        with tempfile.TemporaryDirectory() as folder:
            data = synth.write(Path(folder) / "d.jsonl", per_turn_count, seed=100 + turns, turns=turns)
            for chat in read_jsonl(data, THINK):
                samples = renderer.samples(chat)
                layout = layout_conversation(chat, renderer, Rules(THINK, 1 << 30))
                one_tokens += len(layout)
                one_pairs += int((layout.position_ids.astype(np.int64) + 1).sum())
                lengths = np.array([len(s.input_ids) for s in samples], np.int64)
                n_tokens += int(lengths.sum())
                n_pairs += int((lengths * (lengths + 1) // 2).sum())
        results.append({
            "turns": turns,
            "one_pass_pairs_per_chat": one_pairs / per_turn_count,
            "n_pass_pairs_per_chat": n_pairs / per_turn_count,
            "tokens_n_pass_over_one_pass": n_tokens / one_tokens,
            "pairs_n_pass_over_one_pass": n_pairs / one_pairs,
            "one_pass_tokens_per_chat": one_tokens / per_turn_count,
            "n_pass_tokens_per_chat": n_tokens / per_turn_count,
        })
    return results


def benchmark_chats(count: int) -> tuple[list[dict], list[tuple[np.ndarray, int]], int]:
    """One-pass rows (one chat each), the N-pass samples of the same chats, and the vocabulary
    size after renumbering: a random model needs no real vocabulary, so the ids in use are
    renumbered and a 152k-row output layer does not swamp the blocks being compared."""
    renderer = Renderer(load_tokenizer("qwen").tokenizer, THINK)
    rows, samples = [], []
    with tempfile.TemporaryDirectory() as folder:
        data = synth.write(Path(folder) / "d.jsonl", count, seed=7, turns=3, scale=0.25)
        for chat in read_jsonl(data, THINK):
            layout = layout_conversation(chat, renderer, Rules(THINK, 1 << 30))
            rows.append({
                "input_ids": layout.input_ids, "labels": layout.labels, "position_ids": layout.position_ids,
                "mask_spec": {"seg_lens": layout.seg_lens, "seg_parents": layout.seg_parents},
            })
            samples += [(s.input_ids, s.train_start) for s in renderer.samples(chat)]
    used = np.unique(np.concatenate([row["input_ids"] for row in rows]))

    def renumber(ids: np.ndarray) -> np.ndarray:
        return np.where(ids == -100, -100, np.searchsorted(used, ids)).astype(np.int64)

    for row in rows:
        row["input_ids"], row["labels"] = renumber(row["input_ids"]), renumber(row["labels"])
    return rows, [(renumber(ids), start) for ids, start in samples], len(used)


def training_step(count: int, repeats: int) -> dict:
    """Forward + backward of a small random Qwen3 (CPU): one-pass rows through tree attention
    and through sdpa with a dense mask, vs the N-pass samples (sdpa, causal)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from onepass_prep.torch import OnePassCollator, install_mask_hook

    # oneDNN re-plans its kernels for every new sequence length, and every N-pass sample and
    # one-pass row has its own length: left on, it times planning, not training (all arms).
    torch.backends.mkldnn.enabled = False
    torch.manual_seed(0)
    rows, samples, vocab = benchmark_chats(count)
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=32768,
        attn_implementation="sdpa",
    )
    model = Qwen3ForCausalLM(config)
    collate = OnePassCollator(pad_to_multiple_of=1)

    def one_pass(kind: str) -> Callable[[], None]:
        def run() -> None:
            handle = install_mask_hook(model, kind=kind)
            for row in rows:
                model(**collate([row])).loss.backward()
            handle.remove()
            model.set_attn_implementation("sdpa")  # kind="tree" switched it

        return run

    def n_pass():
        for ids, start in samples:
            labels = torch.as_tensor(ids, dtype=torch.long).clone()
            labels[:start] = -100
            model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None], labels=labels[None]).loss.backward()

    one_tokens = sum(len(row["input_ids"]) for row in rows)
    n_tokens = sum(len(ids) for ids, _ in samples)
    arms = {"one_pass_tree": one_pass("tree"), "one_pass_dense": one_pass("bool"), "n_pass": n_pass}
    # Interleave the arms so that drifting load hits all alike.
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, run in arms.items():
            seconds[name].append(timed(run))
    best = {name: min(times) for name, times in seconds.items()}
    tokens = one_tokens / n_tokens
    tree, dense = best["one_pass_tree"] / best["n_pass"], best["one_pass_dense"] / best["n_pass"]
    return {
        "conversations": count,
        "one_pass_tokens": one_tokens,
        "n_pass_tokens": n_tokens,
        "seconds": best,
        "tokens_one_pass_over_n_pass": tokens,
        "time_tree_over_n_pass": tree,
        "time_dense_over_n_pass": dense,
        "target_ratio": tree / tokens,
        "target_ratio_dense": dense / tokens,
    }


def hybrid_step(count: int, repeats: int, mixer: str = "gated_deltanet") -> dict:
    """Forward + backward of a small random hybrid (CPU): Qwen3.5-shaped (``gated_deltanet``:
    three Gated DeltaNet layers, one full-attention layer) or Nemotron-H-shaped (``mamba2``:
    three Mamba-2 layers, two MLP blocks, one full-attention layer). One-pass rows (sdpa, dense
    mask; the recurrent layers level by level of the tree, recurrent/) vs the N-pass samples,
    on the chats of the training step. Also the levels and kernel calls per row that the tree
    schedule costs."""
    import torch
    from transformers import AutoModelForCausalLM, NemotronHConfig
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

    from onepass_prep.torch import OnePassCollator, install_mask_hook
    from onepass_prep.torch.recurrent import recurrent_plan

    torch.backends.mkldnn.enabled = False
    torch.manual_seed(0)
    rows, samples, vocab = benchmark_chats(count)
    if mixer == "mamba2":
        config = NemotronHConfig(
            vocab_size=vocab, hidden_size=256, intermediate_size=768, num_attention_heads=8,
            num_key_value_heads=4, head_dim=32, mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=64,
            n_groups=2, chunk_size=128,
            layer_types=["linear_attention", "mlp", "linear_attention", "full_attention", "linear_attention", "mlp"],
        )
    else:
        config = Qwen3_5TextConfig(
            vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, head_dim=32, linear_num_key_heads=4,
            linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32,
            layer_types=["linear_attention"] * 3 + ["full_attention"],
        )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    collate = OnePassCollator(pad_to_multiple_of=1)

    def one_pass() -> None:
        handle = install_mask_hook(model)
        for row in rows:
            model(**collate([row])).loss.backward()
        handle.remove()

    def n_pass() -> None:
        for ids, start in samples:
            labels = torch.as_tensor(ids, dtype=torch.long).clone()
            labels[:start] = -100
            model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None], labels=labels[None]).loss.backward()

    best = {name: wall for name, (wall, _) in interleaved({"one_pass": one_pass, "n_pass": n_pass}, repeats).items()}
    plans = [recurrent_plan(collate([row])["subtree_end"]) for row in rows]
    tokens = sum(len(row["input_ids"]) for row in rows) / sum(len(ids) for ids, _ in samples)
    time_ratio = best["one_pass"] / best["n_pass"]
    return {
        "conversations": count,
        "samples": len(samples),
        "seconds": best,
        "tokens_one_pass_over_n_pass": tokens,
        "time_one_pass_over_n_pass": time_ratio,
        "time_ratio_over_tokens_ratio": time_ratio / tokens,
        "levels_per_row": float(np.mean([p.levels for p in plans])),
        "kernel_calls_per_row": float(np.mean([len(p.groups) for p in plans])),
    }


# VmHWM is this process's own peak; ru_maxrss would inherit the benchmark's across exec.
PEAK_RSS = (
    "import sys; from pathlib import Path;"
    "from onepass_prep.convert import ConvertOptions, convert;"
    "convert([Path(sys.argv[1])], Path(sys.argv[2]), ConvertOptions(model='qwen'));"
    "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
)


def memory(counts: list[int]) -> list[dict]:
    """Peak RSS of a whole `convert` process, for growing inputs of short chats."""
    results = []
    for count in counts:
        with tempfile.TemporaryDirectory() as folder:
            data = synth.write(Path(folder) / "d.jsonl", count, seed=11, turns=2, scale=0.1)
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", PEAK_RSS, str(data), str(Path(folder) / "out")],
                capture_output=True, text=True, check=True,
            )
            manifest = json.loads((Path(folder) / "out" / "manifest.json").read_text())
            results.append({
                "conversations": count,
                "input_mb": data.stat().st_size / 1e6,
                "one_pass_tokens": manifest["tokens"]["one_pass"],
                "peak_rss_mb": int(out.stdout.split()[-1]) / 1024,
                "seconds": time.perf_counter() - start,
            })
    return results


def hostile(line_mb: int) -> dict:
    """Peak RSS and time of a `convert` whose input holds one huge line among short chats:
    it is rejected as too long from a bound on its text, before it is tokenized."""
    with tempfile.TemporaryDirectory() as folder:
        data = synth.write(Path(folder) / "d.jsonl", 200, seed=12, turns=2, scale=0.1)
        huge = {"messages": [{"role": "user", "content": "word " * (line_mb * 200_000)},
                             {"role": "assistant", "content": "ok"}]}
        with open(data, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(huge) + "\n")
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, str(data), str(Path(folder) / "out")],
            capture_output=True, text=True, check=True,
        )
        manifest = json.loads((Path(folder) / "out" / "manifest.json").read_text())
        return {
            "line_mb": line_mb,
            "rejected_by_kind": manifest["counts"]["rejected_by_kind"],
            "peak_rss_mb": int(out.stdout.split()[-1]) / 1024,
            "seconds": time.perf_counter() - start,
        }


def engines(count: int, records_per_shard: int) -> dict:
    """Wall time of the same `convert` on the local engine (1 process) and on a local Ray
    cluster the run starts with 1 and 2 workers (same bytes, checked), and Ray's start-up
    cost: the same runs on a 10-chat input."""
    def run(data: Path, out: Path, *extra: str) -> float:
        command = [sys.executable, "-m", "onepass_prep.cli", "convert", str(data), "--model", "qwen",
                   "-o", str(out), "--records-per-shard", str(records_per_shard), *extra]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        return time.perf_counter() - start

    arms = {"local": (), "ray_1": ("--engine", "ray", "--num-proc", "1"), "ray_2": ("--engine", "ray", "--num-proc", "2")}
    with tempfile.TemporaryDirectory() as folder:
        data = synth.write(Path(folder) / "d.jsonl", count, seed=13, turns=2, scale=0.2)
        tiny = synth.write(Path(folder) / "tiny.jsonl", 10, seed=13, turns=2, scale=0.2)
        seconds = {name: run(data, Path(folder) / name, *extra) for name, extra in arms.items()}
        startup = {name: run(tiny, Path(folder) / f"tiny-{name}", *extra) for name, extra in arms.items()}
        outputs = {name: sorted((p.name, p.read_bytes()) for p in (Path(folder) / name).iterdir()) for name in arms}
    assert outputs["local"] == outputs["ray_1"] == outputs["ray_2"], "the engines wrote different bytes"
    return {
        "conversations": count,
        "seconds": seconds,
        "startup_seconds": startup,
        "ray_1_vs_local": seconds["local"] / seconds["ray_1"],
        "ray_2_vs_local": seconds["local"] / seconds["ray_2"],
        "ray_2_vs_ray_1": seconds["ray_1"] / seconds["ray_2"],
        "ray_startup_over_local": startup["ray_2"] - startup["local"],
        # what is left once each arm's own start-up (its 10-chat run) is taken out
        "steady_ray_2_vs_local": (seconds["local"] - startup["local"]) / (seconds["ray_2"] - startup["ray_2"]),
        "steady_ray_2_vs_ray_1": (seconds["ray_1"] - startup["ray_1"]) / (seconds["ray_2"] - startup["ray_2"]),
        "conversations_per_second_local": count / seconds["local"],
    }


def packing(data: Path) -> dict:
    with tempfile.TemporaryDirectory() as out:
        summary = convert([data], Path(out), ConvertOptions(model="qwen", max_seq_len=32768))
    return {"rows": summary.rows, "fill_rate": summary.fill_rate, "rejected_too_long": summary.rejected}


def machine() -> dict:
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results.json")
    parser.add_argument("--only", default=SECTIONS, help=f"comma-separated subset of {SECTIONS}; "
                        "the others are kept from the --out file")
    args = parser.parse_args()
    quick = args.quick
    only = args.only.split(",")
    results: dict = json.loads(args.out.read_text()) if args.out.is_file() and args.only != SECTIONS else {}
    results.update(machine=machine(), quick=quick)
    with tempfile.TemporaryDirectory() as folder:
        data = synth.write(Path(folder) / "bench.jsonl", 20 if quick else 600, seed=1)
        if "conversion" in only:
            print("conversion ...", flush=True)
            results["conversion"] = conversion(data, repeats=1 if quick else 3)
        if "rendering" in only:
            print("rendering, per template ...", flush=True)
            # The first 150 of the same chats: three templates times five arms must fit a run.
            first = synth.write(Path(folder) / "render.jsonl", 20 if quick else 150, seed=1)
            results["rendering"] = rendering(first, rounds=1 if quick else 2)
        if "packing" in only:
            print("packing ...", flush=True)
            results["packing"] = packing(data)
    if "growth" in only:
        print("growth ...", flush=True)
        results["growth"] = growth(2 if quick else 20, 3 if quick else 10)
    if "training" in only:
        print("training step ...", flush=True)
        results["training_step"] = training_step(2 if quick else 6, repeats=1 if quick else 3)
    if "hybrid" in only:
        print("hybrid step ...", flush=True)
        results["hybrid_step"] = hybrid_step(1 if quick else 6, repeats=1 if quick else 3)
        print("hybrid step, Mamba-2 ...", flush=True)
        results["hybrid_step_mamba2"] = hybrid_step(1 if quick else 6, repeats=1 if quick else 3, mixer="mamba2")
    if "memory" in only:
        print("memory ...", flush=True)
        results["memory"] = memory([200, 400] if quick else [10_000, 100_000])
    if "hostile" in only:
        print("hostile ...", flush=True)
        results["hostile"] = hostile(5 if quick else 50)
    if "engines" in only:
        print("engines ...", flush=True)
        results["engines"] = engines(40 if quick else 8000, 10 if quick else 500)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


def report(results: dict) -> str:
    """The Markdown tables of the sections in `results` (a run --only some of them into a
    fresh --out holds only those)."""
    lines = []
    if "conversion" in results:
        c = results["conversion"]
        lines += [
            f"| convert, 1 process, vs one render+tokenize per chat (floor) | {c['convert_1_vs_floor']:.2f}x | >= 0.5x (stretch 1.0x) |",
            f"| convert, 2 processes, vs floor | {c['convert_2_vs_floor']:.2f}x | |",
            f"| convert, 2 processes vs 1 process | {c['convert_2_vs_convert_1']:.2f}x | >= 1.8x |",
            f"| same, start-up left out: 1 process vs floor / 2 vs floor / 2 vs 1 | {c['steady_1_vs_floor']:.2f}x / {c['steady_2_vs_floor']:.2f}x / {c['steady_2_vs_steady_1']:.2f}x | |",
            f"| cores kept busy (CPU time / wall time): 1 process / 2 processes | {c['convert_1_cores_busy']:.2f} / {c['convert_2_cores_busy']:.2f} | of 2 |",
            f"| CPU seconds: floor / convert 1 process / 2 processes | {c['cpu_seconds']['floor']:.1f} / {c['cpu_seconds']['convert_1']:.1f} / {c['cpu_seconds']['convert_2']:.1f} | |",
            f"| convert, 1 process, vs obvious N-pass preprocessing | {c['convert_1_vs_obvious']:.2f}x faster | |",
            f"| obvious N-pass preprocessing, in floors | {c['obvious_cost_in_floors']:.1f}x the floor's time | |",
        ]
    if "packing" in results:
        lines.append(f"| packing fill rate at --max-seq-len 32768 | {results['packing']['fill_rate']:.1%} | >= 95% |")
    if "training_step" in results:
        t = results["training_step"]
        lines += [
            f"| training step time one-pass (tree attention) / N-pass | {t['time_tree_over_n_pass']:.2f} (tokens {t['tokens_one_pass_over_n_pass']:.2f}) | <= 1.15 x tokens ratio: {t['target_ratio']:.2f} |",
            f"| training step time one-pass (sdpa, dense mask) / N-pass | {t['time_dense_over_n_pass']:.2f} (tokens {t['tokens_one_pass_over_n_pass']:.2f}) | x tokens ratio: {t['target_ratio_dense']:.2f} |",
        ]
    if "hybrid_step" in results:
        h = results["hybrid_step"]
        lines.append(f"| training step time one-pass / N-pass, Qwen3.5-shaped hybrid (Gated DeltaNet level by level, {h['levels_per_row']:.1f} levels and {h['kernel_calls_per_row']:.1f} kernel calls per chat) | {h['time_one_pass_over_n_pass']:.2f} (tokens {h['tokens_one_pass_over_n_pass']:.2f}) | x tokens ratio: {h['time_ratio_over_tokens_ratio']:.2f} |")
    if "hybrid_step_mamba2" in results:
        h = results["hybrid_step_mamba2"]
        lines.append(f"| training step time one-pass / N-pass, Nemotron-H-shaped hybrid (Mamba-2 level by level, {h['levels_per_row']:.1f} levels and {h['kernel_calls_per_row']:.1f} kernel calls per chat) | {h['time_one_pass_over_n_pass']:.2f} (tokens {h['tokens_one_pass_over_n_pass']:.2f}) | x tokens ratio: {h['time_ratio_over_tokens_ratio']:.2f} |")
    for m in results.get("memory", []):
        lines.append(f"| convert peak RSS, {m['conversations']:,} chats ({m['input_mb']:.0f} MB in) | {m['peak_rss_mb']:.0f} MB | < 500 MB, flat |")
    if "hostile" in results:
        h = results["hostile"]
        lines.append(f"| convert peak RSS / seconds, 200 chats and one {h['line_mb']} MB line (rejected too-long) | {h['peak_rss_mb']:.0f} MB / {h['seconds']:.1f} s | < 1.5 GB |")
    if "engines" in results:
        e = results["engines"]
        lines.append(f"| convert {e['conversations']:,} chats: Ray 1 worker / Ray 2 workers vs local engine (same bytes) | {e['ray_1_vs_local']:.2f}x / {e['ray_2_vs_local']:.2f}x | |")
        lines.append(f"| Ray 2 workers vs 1 worker | {e['ray_2_vs_ray_1']:.2f}x | |")
        lines.append(f"| Ray start-up (10 chats: Ray 2 workers minus local) | {e['ray_startup_over_local']:.1f} s | |")
        lines.append(f"| same, start-up left out: Ray 2 workers vs local / vs Ray 1 worker | {e['steady_ray_2_vs_local']:.2f}x / {e['steady_ray_2_vs_ray_1']:.2f}x | |")
    if lines:
        lines = ["| measure | result | target |", "| --- | --- | --- |", *lines]
    if "rendering" in results:
        lines += [
            "",
            "| template | convert vs floor, before / after | convert after vs before | rendering after vs before | rendering's share of convert, before / after |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, r in results["rendering"].items():
            lines.append(
                f"| {name} | {r['convert_vs_floor_before']:.2f}x / {r['convert_vs_floor_after']:.2f}x "
                f"| {r['convert_after_vs_before']:.2f}x | {r['render_after_vs_before']:.2f}x "
                f"| {r['render_share_before']:.0%} / {r['render_share_after']:.0%} |"
            )
    if "growth" in results:
        lines += [
            "",
            "| turns | tokens per chat, one-pass / N-pass | ratio | attention pairs per chat (millions), one-pass / N-pass | ratio |",
            "| --- | --- | --- | --- | --- |",
        ]
        for g in results["growth"]:
            lines.append(
                f"| {g['turns']} | {g['one_pass_tokens_per_chat']:,.0f} / {g['n_pass_tokens_per_chat']:,.0f} "
                f"| {g['tokens_n_pass_over_one_pass']:.2f} | {g['one_pass_pairs_per_chat'] / 1e6:.1f} / "
                f"{g['n_pass_pairs_per_chat'] / 1e6:.1f} | {g['pairs_n_pass_over_one_pass']:.2f} |"
            )
    return "\n".join(lines).strip("\n")


if __name__ == "__main__":
    main()
