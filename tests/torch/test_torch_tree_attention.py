"""Tree attention (``attn_implementation="onepass_tree"``) == the dense-mask sdpa path == N passes.

Checked at three levels: the chain plan covers exactly the FORMAT.md mask, the attention
function equals sdpa with the dense mask (outputs and input gradients), and whole models
through the hook give the losses and every parameter gradient of the dense path and of N
separate passes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.paths import ROOT
from helpers.torch_models import (
    dense_reference,
    gradients,
    n_pass,
    summed_loss,
    tiny_model,
    workload,
)
from helpers.torch_rows import random_row
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import onepass_prep.torch.tree_attention as tree_attention_module
from onepass_prep.torch import (
    PLAN_KEY,
    TREE_ATTENTION,
    OnePassCollator,
    bool_mask,
    install_mask_hook,
    tree_plan,
)
from onepass_prep.torch.tree_attention import tree_attention


def random_batch(seed: int, rows: int = 3) -> tuple[list[dict], dict]:
    """Random forests (several roots per row) of different lengths, so with padding."""
    rng = np.random.default_rng(seed)
    batch_rows = [random_row(rng, int(rng.integers(1, 40))) for _ in range(rows)]
    return batch_rows, OnePassCollator(pad_to_multiple_of=16)(batch_rows)


def plan_as_dense(subtree_end: torch.Tensor) -> torch.Tensor:
    """``[B, L, L]``: which (q, kv) pairs the plan lets attend, as one dense picture."""
    plan = tree_plan(subtree_end)
    batch, length = subtree_end.shape
    dense = torch.zeros(batch * length, batch * length, dtype=torch.bool)
    first = 0
    spans = zip(plan.keys.split(plan.key_sizes), plan.query_sizes, plan.masks, strict=True)
    for keys, size, mask in spans:
        if mask == "causal":
            mask = torch.ones(size, size, dtype=torch.bool).tril()
        elif mask == "self":
            mask = torch.eye(size, dtype=torch.bool)
        queries = torch.arange(first, first + size)
        assert not dense[queries[:, None], keys].any()  # every key appears once per query
        dense[queries[:, None], keys] = mask
        first += size
    assert first == batch * length
    blocks = dense.view(batch, length, batch, length).permute(0, 2, 1, 3)
    same_row = torch.eye(batch, dtype=torch.bool)
    assert not blocks[~same_row].any()  # nothing crosses rows
    return blocks[same_row]


@pytest.fixture(params=[2, 256], ids=["piece2", "piece256"])
def piece(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Chains with context are cut into pieces; the test rows' chains are short: cut small too."""
    monkeypatch.setattr(tree_attention_module, "PIECE", request.param)
    return request.param


@pytest.mark.parametrize("seed", range(6))
def test_plan_sees_exactly_the_format_mask(seed: int, piece: int) -> None:
    rows, batch = random_batch(seed)
    expected = dense_reference(rows, batch["input_ids"].shape[1])
    assert torch.equal(plan_as_dense(batch["subtree_end"]), expected)


def test_padding_is_one_span_whatever_its_length() -> None:
    """A long padded tail must not cost one attention call (or one Python step) per token."""
    rows = [random_row(np.random.default_rng(0), 3), random_row(np.random.default_rng(1), 30)]
    plan = tree_plan(OnePassCollator(pad_to_multiple_of=512)(rows)["subtree_end"])
    assert plan.masks.count("self") == 2


@pytest.mark.parametrize("seed", range(3))
def test_attention_function_equals_dense_sdpa(seed: int, piece: int) -> None:
    """Outputs and gradients of query, key and value, with GQA (8 query heads on 2 kv heads)."""
    _, batch = random_batch(seed)
    structure = batch["subtree_end"]
    batch_size, length = structure.shape
    torch.manual_seed(seed)
    inputs = [torch.randn(batch_size, heads, length, 16, requires_grad=True) for heads in (8, 2, 2)]
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True)
    plan = tree_plan(structure)
    got, _ = tree_attention(module, *inputs, None, scaling=0.3, **{PLAN_KEY: plan})
    want, _ = sdpa_attention_forward(module, *inputs, bool_mask(structure), scaling=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, inputs, upstream)
    want_grads = torch.autograd.grad(want, inputs, upstream)
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_tree_attention_equals_dense_mask_and_n_passes(family: str) -> None:
    """Summed loss and every parameter gradient: tree == dense sdpa mask == N passes."""
    samples, batch = workload()
    tree, dense = tiny_model(family, "sdpa"), tiny_model(family, "sdpa")
    install_mask_hook(tree, kind="tree")
    install_mask_hook(dense)
    assert tree.config._attn_implementation == TREE_ATTENTION
    tree_loss = summed_loss(tree(**batch).logits, batch["labels"])
    dense_loss = summed_loss(dense(**batch).logits, batch["labels"])
    tree_grads, dense_grads = gradients(tree, tree_loss), gradients(dense, dense_loss)
    reference = tiny_model(family, "sdpa")
    reference_loss = n_pass(reference, samples)
    reference_grads = gradients(reference, reference_loss)

    torch.testing.assert_close(tree_loss, dense_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(tree_loss, reference_loss, rtol=1e-5, atol=0)
    for name, grad in reference_grads.items():
        scale = float(grad.abs().max())
        for other in (tree_grads, dense_grads):
            torch.testing.assert_close(other[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_random_forests_with_padding_and_gradient_checkpointing() -> None:
    """Logits on every real token equal the dense path; the plan survives checkpointed layers."""
    rows, batch = random_batch(7, rows=4)
    tree, dense = tiny_model("qwen3", "sdpa"), tiny_model("qwen3", "sdpa")
    tree.activation_checkpointing_enable()
    tree.train()
    install_mask_hook(tree, kind="tree")
    install_mask_hook(dense)
    real = torch.zeros_like(batch["labels"], dtype=torch.bool)
    for b, row in enumerate(rows):
        real[b, : row["num_tokens"]] = True
    tree_logits, dense_logits = tree(**batch).logits, dense(**batch).logits
    torch.testing.assert_close(tree_logits[real], dense_logits[real], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(tree_logits).all()  # padding too
    tree_grads = gradients(tree, summed_loss(tree_logits, batch["labels"]))
    dense_grads = gradients(dense, summed_loss(dense_logits, batch["labels"]))
    for name, grad in dense_grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(tree_grads[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_missing_plan_or_a_mask_fails_loudly() -> None:
    """Under onepass_tree transformers builds no mask, so a call without the plan must raise."""
    _, batch = workload()
    model = tiny_model("qwen3", "sdpa")
    handle = install_mask_hook(model, kind="tree")
    plain = {k: v for k, v in batch.items() if k not in ("subtree_end", "loss_weights", "loss_units")}
    with pytest.raises(ValueError, match="subtree_end"):
        model(**plain)
    handle.remove()
    with pytest.raises(ValueError, match=PLAN_KEY):
        model(**plain)  # the implementation stays onepass_tree after remove()
    plan = {PLAN_KEY: tree_plan(batch["subtree_end"])}
    with pytest.raises(ValueError, match="not a mask"):
        model(**plain, **plan, attention_mask=bool_mask(batch["subtree_end"]))
    with pytest.raises(ValueError, match="plan is for"):
        model(**{k: v[:1] for k, v in plain.items()}, **plan)
    model.set_attn_implementation("sdpa")
    install_mask_hook(model)
    with pytest.raises(ValueError, match="already installed"):
        install_mask_hook(model, kind="tree")
    assert model.config._attn_implementation == "sdpa"  # the refused install changed nothing


@pytest.mark.parametrize("extra", [{"dropout": 0.1}, {"sliding_window": 4}, {"softcap": 30.0}])
def test_refuses_what_it_would_silently_ignore(extra: dict) -> None:
    _, batch = random_batch(0, rows=1)
    states = torch.randn(1, 2, batch["subtree_end"].shape[1], 8)
    with pytest.raises(ValueError, match="no dropout, sliding window or softcap"):
        tree_attention(SimpleNamespace(), states, states, states, None,
                       **{PLAN_KEY: tree_plan(batch["subtree_end"])}, **extra)


def test_runtime_imports_without_transformers() -> None:
    """Registration is lazy: importing the runtime must not import transformers."""
    code = "import sys, onepass_prep.torch; print('transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "False"
