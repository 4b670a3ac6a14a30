"""The loss head: logits only where a token is trained, cross-entropy in chunks (head.py).

The oracle is the full-logits path (``forward_loss(..., full_logits=True)``: the model's
``[B, L, V]`` logits, then ``onepass_loss``), itself checked against N separate passes in
test_torch_weighted.py. Chunks are made a few positions long so that every batch spans
several, the last one partial.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers.torch_models import SIZE, VOCAB, VocabWideTensors, gradients, tiny_model
from helpers.torch_rows import NORMALIZATIONS, chat_samples, pack
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    GraniteConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import onepass_prep.torch.head as head_module
from onepass_prep.torch import OnePassCollator, forward_loss, install_mask_hook, step_denominator
from onepass_prep.torch.head import output_head

CHUNK = 7  # positions per chunk in these tests
CHATS = [chat_samples(np.random.default_rng(11), turns) for turns in (3, 1, 4, 2, 3)]
WEIGHTS = [[1, 0, 0.5], [2.0], [0.25, 1, 0, 1.5], [0, 0.75], [1, 0.5, 1]]

CONFIGS = {
    # final-logit softcapping (small, so that tanh bends); tied embeddings; sliding-window
    # layers made full here (per-layer masks are the hook's business, not the head's)
    "gemma2": Gemma2Config(
        **SIZE, final_logit_softcapping=2.0, layer_types=["full_attention"] * 2, sliding_window=4096
    ),
    "qwen3-tied": Qwen3Config(**SIZE, tie_word_embeddings=True),
    "granite": GraniteConfig(**SIZE, logits_scaling=3.0),  # logits divided by the scaling
    "cohere": CohereConfig(**SIZE, logit_scale=0.5),  # logits times the scale, tied
}
ATTENTION = {"gemma2": "eager"}  # attention softcapping is eager-only


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(head_module, "CHUNK_ELEMENTS", CHUNK * VOCAB)


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    if family in ("qwen3", "llama"):
        return tiny_model(family, "sdpa", seed)
    torch.manual_seed(seed)
    config = copy.deepcopy(CONFIGS[family])
    return AutoModelForCausalLM.from_config(
        config, attn_implementation=ATTENTION.get(family, "sdpa"), dtype=torch.float32
    )


def micro_batches(normalization: str) -> list[dict]:
    """A step of two micro-batches: two rows padded to one length, then one row."""
    rows = [pack([CHATS[c] for c in chats], [f"c{c}" for c in chats], [WEIGHTS[c] for c in chats],
                 normalization) for chats in ([0, 1], [2], [3, 4])]
    collate = OnePassCollator(pad_to_multiple_of=16)
    return [collate(rows[:2]), collate(rows[2:])]


def step(model: torch.nn.Module, micro: list[dict], **kwargs) -> tuple[torch.Tensor, dict]:
    denominator = step_denominator(micro)
    loss = sum(forward_loss(model, batch, denominator, **kwargs)[0] for batch in micro)
    return loss.detach(), gradients(model, loss)


def assert_same(got: tuple[torch.Tensor, dict], want: tuple[torch.Tensor, dict]) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)
    assert want[0] > 0
    for name, grad in want[1].items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(got[1][name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("family", ["qwen3", "llama", "gemma2", "qwen3-tied", "granite", "cohere"])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_chunked_head_equals_full_logits(family: str, normalization: str) -> None:
    """Loss and every parameter's gradient over a step with accumulation, B = 2 with padding
    and B = 1, message weights (0 among them); the same without a gradient (evaluation)."""
    model = make_model(family)
    install_mask_hook(model)
    assert output_head(model) is not None
    micro = micro_batches(normalization)
    assert_same(step(model, micro), step(model, micro, full_logits=True))
    with torch.no_grad():
        denominator = step_denominator(micro)
        torch.testing.assert_close(
            forward_loss(model, micro[0], denominator)[0],
            forward_loss(model, micro[0], denominator, full_logits=True)[0], rtol=1e-5, atol=0,
        )


class OwnForward(Qwen3ForCausalLM):
    """A subclass with its own forward: its head cannot be known, whatever it does."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def test_unknown_head_keeps_trained_positions() -> None:
    """An unrecognised model gets logits_to_keep: its own head on the union over the batch's
    rows of the positions that predict a trained token, and the same loss and gradients."""
    torch.manual_seed(0)
    model = OwnForward(copy.deepcopy(tiny_model("qwen3", "sdpa").config))
    install_mask_hook(model)
    assert output_head(model) is None
    micro = micro_batches("turn")
    batch = micro[0]
    _, outputs = forward_loss(model, batch, 1)
    predicting = (batch["labels"][:, 1:] != -100).any(0)
    assert outputs.logits.shape == (2, int(predicting.sum()), VOCAB)
    assert outputs.logits.shape[1] < batch["labels"].shape[1] - 1  # some positions left out
    assert_same(step(model, micro), step(model, micro, full_logits=True))


class IgnoresLogitsToKeep(Qwen3ForCausalLM):
    def forward(self, *args, logits_to_keep=0, **kwargs):
        return super().forward(*args, **kwargs)


def test_a_model_that_ignores_logits_to_keep_is_still_right() -> None:
    torch.manual_seed(0)
    model = IgnoresLogitsToKeep(copy.deepcopy(tiny_model("qwen3", "sdpa").config))
    install_mask_hook(model)
    micro = micro_batches("token")
    assert forward_loss(model, micro[0], 1)[1].logits.shape[:2] == micro[0]["labels"].shape
    assert_same(step(model, micro), step(model, micro, full_logits=True))


def test_tree_attention_takes_the_chunked_head() -> None:
    model = make_model("llama")
    install_mask_hook(model, kind="tree")
    micro = micro_batches("conversation")
    assert_same(step(model, micro), step(model, micro, full_logits=True))


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_no_full_logits_in_the_training_path(family: str) -> None:
    """Forward and backward: no tensor of the vocabulary's width holds more than one chunk of
    positions (the full path, run the same way, holds all B x L: the check can fail)."""
    model = make_model(family)
    install_mask_hook(model)
    batch = micro_batches("token")[0]
    positions = batch["labels"].numel()
    assert VOCAB not in (SIZE["hidden_size"], SIZE["intermediate_size"])
    for full, most in ((False, CHUNK), (True, positions)):
        with VocabWideTensors(VOCAB) as seen:
            forward_loss(model, batch, 1, full_logits=full)[0].backward()
        assert seen.most == most, (full, seen.most)


def test_what_is_recognised() -> None:
    """Known forwards with a plain linear head; not a subclass's forward, a head of another
    type, or a forward replaced on the instance (except TRL's pass-through patch)."""
    from trl.trainer.utils import add_fused_lm_head

    model = make_model("qwen3")
    found = output_head(model)
    assert found is not None and found.weight is model.lm_head.weight and found.body is model.model
    assert found.transform is None
    assert output_head(make_model("gemma2")).transform is not None
    tied = make_model("qwen3-tied")
    assert output_head(tied).weight is tied.model.embed_tokens.weight

    patched = make_model("qwen3")
    patched.forward = lambda *args, **kwargs: Qwen3ForCausalLM.forward(patched, *args, **kwargs)
    assert output_head(patched) is None
    fused = make_model("qwen3")
    add_fused_lm_head(fused)  # what SFTTrainer does to every model it trains
    assert output_head(fused) is not None
    other = make_model("qwen3")
    other.lm_head = torch.nn.Sequential(other.lm_head)
    assert output_head(other) is None


def test_empty_batch_has_a_zero_loss_with_gradients() -> None:
    """A micro-batch that trains nothing: loss 0, connected to the graph, zero gradients."""
    model = make_model("qwen3")
    install_mask_hook(model)
    batch = micro_batches("token")[0]
    batch = {**batch, "labels": torch.full_like(batch["labels"], -100),
             "loss_weights": torch.zeros_like(batch["loss_weights"])}
    loss, _ = forward_loss(model, batch, 0)
    assert loss.item() == 0
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_mixed_precision_and_trl_wrappers_keep_the_chunked_head() -> None:
    """SFTTrainer's fused-head patch under accelerate's bf16 wrapper (autocast, outputs to
    float32), as Trainer prepares a model: still recognised, and the head runs under the
    forward's autocast, as the model's own would (bf16 agreement with the full logits)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from trl.trainer.utils import add_fused_lm_head

    model = make_model("qwen3")
    install_mask_hook(model)
    add_fused_lm_head(model)
    AcceleratorState._reset_state(True)  # an earlier Trainer test in this process set its own
    try:
        prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare(model)
        assert output_head(prepared) is not None
        micro = micro_batches("turn")
        loss, grads = step(prepared, micro)
        full_loss, full_grads = step(prepared, micro, full_logits=True)
    finally:
        AcceleratorState._reset_state(True)
    torch.testing.assert_close(loss, full_loss, rtol=2e-2, atol=0)
    for name, grad in full_grads.items():
        cosine = torch.nn.functional.cosine_similarity(grads[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.99, name


def test_trainer_evaluation_takes_the_chunked_head(tmp_path) -> None:
    """onepass_trainer(Trainer).evaluate(): each batch over its own units, without logits;
    full_logits=True gives the same loss and every position's logits."""
    from helpers.torch_rows import write_run
    from helpers.trainers import common_args
    from transformers import Trainer, TrainingArguments

    from onepass_prep.torch import OnePassDataset, onepass_trainer

    rows = [pack([CHATS[c] for c in chats], [f"c{c}" for c in chats], [WEIGHTS[c] for c in chats],
                 "conversation") for chats in ([0, 1], [2], [3, 4])]
    folder = write_run(tmp_path / "rows", rows, rows_per_shard=3, rows_per_group=3,
                       loss={"normalization": "conversation", "train_on": "all"})
    dataset = OnePassDataset(folder, cache_dir=tmp_path / "cache")
    model = make_model("qwen3")
    install_mask_hook(model)
    collate = OnePassCollator(pad_to_multiple_of=16)
    logits = {}

    def evaluate(full: bool) -> float:
        def keep(predictions):
            logits[full] = predictions.predictions
            return {}

        trainer = onepass_trainer(Trainer, full_logits=full)(
            model=model, args=TrainingArguments(**common_args(tmp_path / "out"), per_device_eval_batch_size=1),
            eval_dataset=dataset, data_collator=collate, compute_metrics=keep,
        )
        return trainer.evaluate()["eval_loss"]

    chunked, full = evaluate(False), evaluate(True)
    with torch.no_grad():
        by_hand = np.mean([
            forward_loss(model, batch, batch["loss_units"].sum(), full_logits=True)[0].item()
            for batch in (collate([row]) for row in rows)
        ])
    assert chunked == pytest.approx(by_hand, rel=1e-5) and full == pytest.approx(by_hand, rel=1e-5)
    assert logits[False].shape[1] == 0 and logits[True].shape[1] > 0
