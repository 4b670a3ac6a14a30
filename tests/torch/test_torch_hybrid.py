"""Hybrid models (Gated DeltaNet + attention) through a tree row == N separate passes.

The oracle is an untouched copy of each tiny random model run on every N-pass sample alone.
The plan is checked against the FORMAT.md tree (helpers.torch_rows.token_parents, walked from
seg_parents) and its convolution against a plain conv1d along each token's path; whole models
through install_mask_hook give the per-token losses, the step objective of each loss
normalization and every parameter's gradient of N passes, through each attention
implementation the families offer on CPU (sdpa, eager; no flex) and tree attention. Negative
controls: without the plan, without the state handover, and without the parent's convolution
inputs, the losses differ.

The delta-rule kernel runs in float32 whatever the model's dtype, and splits a sequence into
64-token chunks; two chunkings of the same sequence already differ by about 1e-4 of the largest
gradient entry (A_log, dt_bias: sums over every token). Gradients are compared at 1e-3 of each
tensor's largest entry, losses at 1e-5; every negative control misses by far more.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.torch_models import gradients, n_pass_objective
from helpers.torch_rows import NORMALIZATIONS, chat_samples, pack, random_row, token_parents
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3NextConfig
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

import onepass_prep.torch.recurrent as recurrent
from onepass_prep.torch import (
    OnePassCollator,
    build_attention_mask,
    forward_loss,
    install_mask_hook,
    step_denominator,
)
from onepass_prep.torch.recurrent import RECURRENT_PLAN_KEY, handles, recurrent_plan, tree_conv

VOCAB = 256
SIZE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.1,
    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_conv_kernel_dim=4, layer_types=["linear_attention", "full_attention", "linear_attention"],
)
CONFIGS: dict[str, Callable] = {
    "qwen3_5": lambda: Qwen3_5TextConfig(**SIZE),
    "qwen3_next": lambda: Qwen3NextConfig(
        **SIZE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    ),
}
ATTENTION = ["sdpa", "eager", "tree"]


def hybrid(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="sdpa", dtype=torch.float32)


def tool_chain(rng: np.random.Generator, calls: int) -> list[tuple[list, int]]:
    """N-pass samples of an agent turn: each call's reasoning stays in every later sample's
    prompt (the tool result follows it), so the tree is deep."""
    def span(lo: int, hi: int) -> list[int]:
        return rng.integers(3, VOCAB, size=int(rng.integers(lo, hi))).tolist()

    prompt = span(3, 7) + [1, 2]
    samples = []
    for _ in range(calls):
        step = span(2, 6) + span(2, 5)  # reasoning, then the call
        samples.append((prompt + step, len(prompt)))
        prompt = prompt + step + span(2, 5) + [1, 2]  # the tool's result, the next header
    return samples


def chats() -> list[list[tuple[list, int]]]:
    rng = np.random.default_rng(3)
    return [chat_samples(rng, 3, VOCAB), tool_chain(rng, 3), chat_samples(rng, 1, VOCAB),
            chat_samples(rng, 4, VOCAB), tool_chain(rng, 2)]


CHATS = chats()
ROWS = [[0, 1, 2], [3, 4]]  # batch of two rows, several conversations packed in each, padded
WEIGHTS = [[1, 0.5, 2], [1, 0, 1.5], [0.25], [1, 1, 0, 3], [2, 1]]


def batch(normalization: str = "token", weights: list | None = None) -> dict:
    rows = [
        pack([CHATS[c] for c in row], [f"c{c}" for c in row],
             None if weights is None else [weights[c] for c in row], normalization)
        for row in ROWS
    ]
    return OnePassCollator(pad_to_multiple_of=32)(rows)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    trained = labels[:, 1:] != -100
    return F.cross_entropy(logits[:, :-1][trained], labels[:, 1:][trained], reduction="none")


def n_pass_token_losses(model: torch.nn.Module) -> torch.Tensor:
    losses = []
    for tokens, start in (s for chat in CHATS for s in chat):
        ids = torch.tensor([tokens])
        labels = ids.clone()
        labels[:, :start] = -100
        losses.append(token_losses(model(input_ids=ids).logits, labels))
    return torch.cat(losses)


def one_pass_inputs(model: torch.nn.Module, collated: dict) -> dict:
    return {k: v for k, v in collated.items() if k not in ("labels", "loss_weights", "loss_units")}


def assert_gradients_close(got: dict, want: dict) -> None:
    for name, grad in want.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(got[name], grad, rtol=1e-3, atol=1e-3 * scale, msg=name)


@pytest.mark.parametrize("seed", range(5))
def test_plan_follows_the_format_tree(seed: int) -> None:
    """Parents are the FORMAT.md tree's; every token is in one chain; a chain runs after the
    chain it continues and starts from its final state; a chain's tokens are a parent path."""
    rng = np.random.default_rng(seed)
    rows = [random_row(rng, int(rng.integers(1, 40))) for _ in range(3)]
    collated = OnePassCollator(pad_to_multiple_of=16)(rows)
    plan = recurrent_plan(collated["subtree_end"])
    batch_size, length = collated["subtree_end"].shape
    total = batch_size * length
    want = np.arange(total) - 1  # padding: roots
    want[np.arange(0, total, length)] = -1
    for b, row in enumerate(rows):
        parents = np.array(token_parents(row["mask_spec"]["seg_lens"], row["mask_spec"]["seg_parents"]))
        want[b * length : b * length + len(parents)] = np.where(parents >= 0, parents + b * length, -1)
        want[b * length + len(parents) : (b + 1) * length] = -1
    got = plan.parents[:-1].numpy()
    np.testing.assert_array_equal(np.where(got == total, -1, got), want)

    ran = np.zeros(total + 1, bool)
    last_token: list[list[int]] = []  # per group, per chain: the token its final state follows
    for group in plan.groups:
        tokens = group.tokens.numpy()
        initial = [(g, int(r)) for g, rows in group.sources for r in rows]
        initial = [initial[i] for i in group.state_order.tolist()]
        last_token.append([])
        for chain, (g, row) in zip(tokens, initial, strict=True):
            real = chain[chain < total]
            assert (chain[len(real):] == total).all()  # padded at the end only
            assert not ran[real].any()
            head_parent = want[real[0]]
            assert (g == -1) == (head_parent == -1)  # a root starts from zeros
            assert g == -1 or last_token[g][row] == head_parent  # else from its parent's state
            assert (want[real[1:]] == real[:-1]).all()
            last_token[-1].append(real[-1])
        ran[tokens[tokens < total]] = True
    ran[total] = True
    assert ran.all()
    assert plan.output_rows.unique().numel() == total


def test_tree_conv_is_conv1d_along_each_path() -> None:
    rng = np.random.default_rng(0)
    rows = [random_row(rng, 30) for _ in range(2)]
    collated = OnePassCollator(pad_to_multiple_of=16)(rows)
    plan = recurrent_plan(collated["subtree_end"])
    total, channels, taps = plan.parents.numel() - 1, 6, 4
    x = torch.randn(total, channels, dtype=torch.float64)
    weight, bias = torch.randn(channels, taps, dtype=torch.float64), torch.randn(channels, dtype=torch.float64)
    got = tree_conv(x, weight, bias, plan.parents)
    for j in range(total):
        path = [j]
        while len(path) < taps and plan.parents[path[-1]] < total:
            path.append(int(plan.parents[path[-1]]))
        sequence = x[path[::-1]].T[None]  # the path as a sequence, root side first
        want = F.conv1d(sequence, weight[:, None], bias, padding=taps - 1, groups=channels)[0, :, len(path) - 1]
        torch.testing.assert_close(got[j], want)


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("attention", ATTENTION)
def test_one_pass_equals_n_passes(family: str, attention: str) -> None:
    """Per-token losses (as multisets: the tree orders tokens differently) and every gradient."""
    model = hybrid(family)
    if attention != "tree":
        model.set_attn_implementation(attention)
    reference = copy.deepcopy(model)
    assert handles(model)
    install_mask_hook(model, kind="tree" if attention == "tree" else None)
    collated = batch()
    one = token_losses(model(**one_pass_inputs(model, collated)).logits, collated["labels"])
    want = n_pass_token_losses(reference)
    torch.testing.assert_close(one.sort().values, want.sort().values, rtol=1e-5, atol=1e-5)
    assert_gradients_close(gradients(model, one.sum()), gradients(reference, want.sum()))


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_loss_normalizations_equal_n_pass_objective(family: str, normalization: str) -> None:
    """Message weights (0 included) under each normalization, through forward_loss."""
    model = hybrid(family, seed=1)
    reference = copy.deepcopy(model)
    install_mask_hook(model)
    collated = batch(normalization, WEIGHTS)
    one = forward_loss(model, collated, step_denominator([collated]))[0]
    want = n_pass_objective(reference, CHATS, WEIGHTS, normalization)
    torch.testing.assert_close(one.double(), want, rtol=1e-5, atol=0)
    assert_gradients_close(gradients(model, one), gradients(reference, want))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_without_the_handover_the_losses_differ(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The row read in order (the mask alone), every chain from a zero state, and every chain's
    convolution without its parent's inputs: each misses the N-pass losses."""
    model = hybrid(family)
    with torch.no_grad():
        want = n_pass_token_losses(copy.deepcopy(model)).sort().values
    handle = install_mask_hook(model)
    collated = batch()
    inputs = one_pass_inputs(model, collated)

    def losses(call: dict) -> torch.Tensor:
        with torch.no_grad():
            return token_losses(model(**call).logits, collated["labels"]).sort().values

    torch.testing.assert_close(losses(inputs), want, rtol=1e-5, atol=1e-5)  # the full handover
    plan = recurrent_plan(collated["subtree_end"])
    mask = build_attention_mask(model, collated["subtree_end"])
    no_hook = {k: v for k, v in inputs.items() if k != "subtree_end"}

    def missed(got: torch.Tensor) -> float:
        return float((got - want).abs().max())

    handle.remove()
    zero_states = recurrent.RecurrentPlan(
        plan.shape, plan.parents,
        [recurrent.Group(g.tokens, [(-1, g.state_order)], torch.arange(len(g.tokens))) for g in plan.groups],
        plan.output_rows, plan.levels,
    )
    total = plan.parents.numel() - 1
    chain_heads = torch.cat([g.tokens[:, 0] for g in plan.groups])
    cut_parents = plan.parents.clone()
    cut_parents[chain_heads] = total
    cut_conv = recurrent.RecurrentPlan(plan.shape, cut_parents, plan.groups, plan.output_rows, plan.levels)
    for name, got in [
        ("in row order", losses({**no_hook, "attention_mask": mask})),
        ("zero states", losses({**no_hook, "attention_mask": mask, RECURRENT_PLAN_KEY: zero_states})),
        ("conv cut", losses({**no_hook, "attention_mask": mask, RECURRENT_PLAN_KEY: cut_conv})),
    ]:
        assert missed(got) > 1e-3, name  # a hundred times the tolerance above


def test_installed_model_runs_plain_calls_as_before() -> None:
    """Without a plan (hook removed: generation, evaluation) the layers run their own forward."""
    model = hybrid("qwen3_5")
    reference = copy.deepcopy(model)
    install_mask_hook(model).remove()
    ids = torch.tensor([CHATS[0][0][0]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)


def test_gradient_checkpointing() -> None:
    model = hybrid("qwen3_next")
    reference = copy.deepcopy(model)
    model.activation_checkpointing_enable()
    model.train()
    install_mask_hook(model)
    collated = batch()
    one = token_losses(model(**one_pass_inputs(model, collated)).logits, collated["labels"])
    want = n_pass_token_losses(reference)
    torch.testing.assert_close(one.sort().values, want.sort().values, rtol=1e-5, atol=1e-5)
    assert_gradients_close(gradients(model, one.sum()), gradients(reference, want.sum()))


def test_only_known_recurrent_layers_are_handled() -> None:
    llama = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in SIZE.items() if "linear" not in k and k != "layer_types"}))
    assert not handles(llama)
    with pytest.raises(ValueError, match="no tree forward for the recurrent layers of this model"):
        recurrent.install_tree_recurrence(llama)
