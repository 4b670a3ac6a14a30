"""One forward pass through the hook == N separate passes: losses and every gradient.

The rows are laid out by hand (helpers.torch_rows.layout) from synthetic reasoning chats, so
this checks the runtime against the FORMAT.md contract without the converter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.paths import ROOT, TESTS
from helpers.torch_models import gradients, n_pass, summed_loss, tiny_model, workload

from onepass_prep.torch import bool_mask, float_mask, install_mask_hook


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_one_pass_equals_n_passes(family: str, attn: str) -> None:
    samples, batch = workload()
    model = tiny_model(family, attn)
    handle = install_mask_hook(model)
    one = summed_loss(model(**batch).logits, batch["labels"])
    one_grads = gradients(model, one)
    handle.remove()
    reference = n_pass(model, samples)
    reference_grads = gradients(model, reference)

    assert int((batch["labels"] != -100).sum()) == sum(len(t) - s for t, s in samples)
    torch.testing.assert_close(one, reference, rtol=1e-5, atol=0)
    for name, grad in reference_grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(one_grads[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_models_own_mean_loss_is_the_summed_loss_over_trained_tokens() -> None:
    samples, batch = workload(1)
    model = tiny_model("qwen3", "sdpa")
    with torch.no_grad():
        reference = n_pass(model, samples)
        install_mask_hook(model)
        mean = model(**batch).loss
    trained = sum(len(t) - s for t, s in samples)
    torch.testing.assert_close(mean * trained, reference, rtol=1e-5, atol=0)


def test_trap_without_mask_position_ids_read_as_packed_documents() -> None:
    """No 4D mask: transformers splits at every position reset and attends across branches."""
    samples, batch = workload()
    model = tiny_model("qwen3", "sdpa")
    plain = {k: v for k, v in batch.items() if k not in ("subtree_end", "loss_weights", "loss_units")}
    with torch.no_grad():
        reference = n_pass(model, samples)
        without = summed_loss(model(**plain).logits, batch["labels"])
    assert abs(float(without - reference)) > 1e-2 * float(reference)

    seen: list = []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    install_mask_hook(model)
    with torch.no_grad():
        model(**batch)
    assert seen[-1].shape == (2, 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    with pytest.raises(ValueError, match="subtree_end"):
        model(**plain)
    with pytest.raises(ValueError, match="position_ids"):
        model(**{k: v for k, v in batch.items() if k != "position_ids"})


def test_trap_eager_adds_a_bool_mask_as_numbers() -> None:
    """Eager adds a bool mask as 0/1 (silently wrong); the hook gives eager a float mask."""
    samples, batch = workload()
    eager, sdpa = tiny_model("qwen3", "eager"), tiny_model("qwen3", "sdpa")
    inputs = {k: v for k, v in batch.items() if k not in ("subtree_end", "loss_weights", "loss_units")}
    with torch.no_grad():
        reference = n_pass(sdpa, samples)
        as_bool = eager(**inputs, attention_mask=bool_mask(batch["subtree_end"])).logits
        as_float = eager(**inputs, attention_mask=float_mask(batch["subtree_end"], torch.float32))
    assert abs(float(summed_loss(as_bool, batch["labels"]) - reference)) > 1e-2 * float(reference)
    torch.testing.assert_close(summed_loss(as_float.logits, batch["labels"]), reference, rtol=1e-5, atol=0)

    with pytest.raises(ValueError, match="eager"):
        install_mask_hook(eager, kind="bool")
    install_mask_hook(eager)
    install_mask_hook(sdpa)
    with torch.no_grad():
        torch.testing.assert_close(
            summed_loss(eager(**batch).logits, batch["labels"]),
            summed_loss(sdpa(**batch).logits, batch["labels"]), rtol=1e-5, atol=0,
        )


def test_sdpa_float_and_bool_masks_agree() -> None:
    _, batch = workload()
    model = tiny_model("llama", "sdpa")
    with torch.no_grad():
        handle = install_mask_hook(model, kind="float")
        as_float = model(**batch).logits
        handle.remove()
        install_mask_hook(model, kind="bool")
        as_bool = model(**batch).logits
    torch.testing.assert_close(as_float, as_bool, rtol=1e-5, atol=1e-5)


def test_hook_is_installed_once() -> None:
    model = tiny_model("qwen3", "sdpa")
    handle = install_mask_hook(model)
    with pytest.raises(ValueError, match="already installed"):
        install_mask_hook(model)
    handle.remove()
    install_mask_hook(model)


def test_hook_refuses_attention_without_tree_masks() -> None:
    model = tiny_model("qwen3", "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        install_mask_hook(model)


FLEX_MODEL = textwrap.dedent(
    """
    import torch
    torch.backends.mkldnn.enabled = False
    from helpers.torch_models import n_pass, summed_loss, tiny_model, workload
    from onepass_prep.torch import install_mask_hook
    samples, batch = workload()
    flex, sdpa = tiny_model("qwen3", "flex_attention"), tiny_model("qwen3", "sdpa")
    install_mask_hook(flex)
    with torch.no_grad():
        got = summed_loss(flex(**batch).logits, batch["labels"])
        want = n_pass(sdpa, samples)
    print(float(abs(got - want) / want))
    """
)


def test_flex_model_forward_through_hook_equals_n_passes() -> None:
    """BlockMask path, forward only (no CPU backward), in a subprocess in case flex crashes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [TESTS, ROOT]))}
    done = subprocess.run(
        [sys.executable, "-c", FLEX_MODEL], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-5
