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

import numpy as np
import pytest
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


def test_fsdp2_bf16_mixed_precision_is_close_to_float32(results: dict) -> None:
    """bf16 parameters, fp32 reduction, against one float32 process: the loss (summed in
    float32 from bf16 logits) within 1e-4, every gradient within 10% of its largest entry and
    pointing the same way (cosine > 0.999)."""
    result = results["qwen3-bf16"]
    reference = result["one_process"]
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    assert result["loss"] != reference["loss"]  # it did compute in bf16
    assert worst_gradient(result["grads"], reference["grads"]) < 0.1
    for name, want in reference["grads"].items():
        got, want = np.ravel(result["grads"][name]), np.ravel(want)
        cosine = got @ want / (np.linalg.norm(got) * np.linalg.norm(want))
        assert cosine > 0.999, name
