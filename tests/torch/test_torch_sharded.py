"""FSDP2 (``fully_shard``) with two gloo ranks == one process, with the chunked head in use.

One launch (helpers/sharded.py) trains one step with gradient accumulation for each case:
tiny Qwen3 (untied, tied, the head an FSDP unit of its own), Gemma 3 (sliding windows), Qwen3.5
(linear attention), bf16 mixed precision and activation checkpointing. The oracle is one
process without FSDP over the same rows, through the full-logits path.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.paths import ROOT, TESTS
from helpers.processes import run_bounded
from helpers.sharded import CASES, CHUNK


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [TESTS, ROOT]))}
    done = run_bounded(
        [sys.executable, "-m", "helpers.sharded", f"file://{out / 'rendezvous'}", str(out)], 300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def worst_gradient(got: dict, want: dict) -> float:
    """The largest difference of any parameter's gradient, relative to that gradient's largest entry."""
    assert got.keys() == want.keys()
    return max(
        float(np.abs(np.subtract(got[n], want[n])).max() / max(np.abs(want[n]).max(), 1e-12)) for n in want
    )


@pytest.mark.parametrize("case", [c for c in CASES if c != "qwen3-bf16"])
def test_fsdp2_step_equals_one_process(results: dict, case: str) -> None:
    result = results[case]
    reference = result["one_process"]
    assert reference["loss"] > 0
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert worst_gradient(result["grads"], reference["grads"]) < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_keeps_the_head_chunked(results: dict, case: str) -> None:
    """No tensor of the vocabulary's width held more than one chunk of positions on either
    rank (the model's own head got none: checked in the ranks), forward or backward."""
    assert results[case]["most"] == CHUNK < results[case]["trained"]


def test_fsdp2_bf16_mixed_precision_equals_one_bf16_process(results: dict) -> None:
    """bf16 parameters, fp32 reduction: the loss is one bf16 process's up to float32 summation
    order (the rounding itself depends on the CPU's bf16 kernels, so it is compared with the
    same rounding, not with a tolerance against float32)."""
    result = results["qwen3-bf16"]
    assert result["loss"] == pytest.approx(result["one_process_bf16_loss"], rel=1e-6)
    assert result["loss"] != pytest.approx(result["one_process"]["loss"], rel=1e-6)  # it did compute in bf16


def test_fsdp2_bf16_mixed_precision_is_close_to_float32(results: dict) -> None:
    """Against one float32 process: the loss within 1e-3 (bf16 rounds to 2**-9), every
    gradient within 10% of its largest entry and pointing the same way (cosine > 0.999)."""
    result = results["qwen3-bf16"]
    reference = result["one_process"]
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-3)
    assert worst_gradient(result["grads"], reference["grads"]) < 0.1
    for name, want in reference["grads"].items():
        got, want = np.ravel(result["grads"][name]), np.ravel(want)
        cosine = got @ want / (np.linalg.norm(got) * np.linalg.norm(want))
        assert cosine > 0.999, name


# ---- the launchers of examples/train_sharded.py under torchrun, against one process ----

RECORDS = 8  # converted without packing: a row each


@pytest.fixture(scope="module")
def eight_rows(tmp_path_factory: pytest.TempPathFactory, sample_path) -> Path:
    from typer.testing import CliRunner

    from onepass_prep.cli import app

    tmp = tmp_path_factory.mktemp("launchers")
    lines = sample_path.read_text(encoding="utf-8").splitlines()[:RECORDS]
    (tmp / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["convert", str(tmp / "chats.jsonl"), "--model", "qwen", "--no-pack",
                                      "--loss-normalization", "conversation", "-o", str(tmp / "rows")])
    assert result.exit_code == 0, result.output
    return tmp / "rows"


def one_process_losses(folder: Path, steps: list[list[int]]) -> list[float]:
    """SGD steps of one process over the given rows (indices in file order): each step's loss."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from common import load_model
        from train_sharded import LEARNING_RATE
    finally:
        sys.path.pop(0)
    from onepass_prep.torch import OnePassCollator, OnePassDataset, forward_loss, install_mask_hook

    model = load_model(None, "sdpa")
    install_mask_hook(model)
    rows = OnePassDataset(folder, cache_dir=folder.parent / "cache")
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    losses = []
    for indices in steps:
        batches = [OnePassCollator()([rows[i]]) for i in indices]
        denominator = sum(int(b["loss_units"].sum()) for b in batches)
        loss = sum(forward_loss(model, b, denominator, use_cache=False)[0] for b in batches)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("launcher", "wrapping"), [
    ("plain", "FSDP2"),
    # accelerate 1.16 never uses FSDP on a CPU (its CPU ranks are MULTI_CPU: DDP), so the
    # accelerate, Trainer and SFT launchers would run DDP here, which the DDP tests of
    # test_torch_weighted.py and test_torch_dataset.py already cover; left out for CI time
])
def test_sharded_example_launchers_equal_one_process(launcher: str, wrapping: str, eight_rows: Path,
                                                     tmp_path: Path) -> None:
    """Two gloo ranks under torchrun, three SGD steps of one row per rank: the streaming
    loops (plain, Accelerator) give rank r the r-th half of the rows, Trainer's sampler
    alternates them; every step's loss equals one process's over the same rows."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = run_bounded(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
         str(ROOT / "examples" / "train_sharded.py"), str(eight_rows), "--launcher", launcher],
        240, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"training under {wrapping}" in done.stdout
    losses = [float(line.split()[-1]) for line in done.stdout.splitlines() if line.startswith("step ")]
    half = RECORDS // 2
    steps = [[k, half + k] for k in range(3)] if launcher in ("plain", "accelerate") else [[2 * k, 2 * k + 1] for k in range(3)]
    expected = one_process_losses(eight_rows, steps)
    assert len(losses) == 3 and losses[0] != losses[-1]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
