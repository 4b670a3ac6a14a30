"""Hybrid models (recurrent mixers + attention) through a tree row == N separate passes.

Every recurrent family transformers has a driven mixer for: Gated DeltaNet (Qwen3.5,
Qwen3-Next, OLMo hybrid), Kimi Delta Attention (Kimi Linear), Mamba-2 (Nemotron-H, Granite 4 hybrid, Bamba, Falcon-H1 beside the
attention of every layer) and the gated short convolution (LFM2, LFM2-MoE); an attention-only
Nemotron-H (no recurrent layer at all) too. The oracle is an untouched copy of each tiny random
model run on every N-pass sample alone (all in one right-padded batch). The plan is checked against the FORMAT.md tree
(helpers.torch_rows.token_parents, walked from seg_parents) and its convolution against a plain
conv1d along each token's path; whole models through install_mask_hook give the per-token
losses, the step objective of each loss normalization and every parameter's gradient of N
passes, through sdpa, eager and tree attention. The batch holds, besides chats and tool chains,
a conversation with a long and a short branch, each with two children: the long one fills more
of the plan's chunks, so the two branches run in separate kernel calls and their children's
call takes states from both (``Group.state_order``). Negative controls: without the plan,
without the state handover, and without the parent's convolution inputs, the losses differ.

The scan kernels run in float32 whatever the model's dtype and split a sequence into chunks;
two chunkings of the same sequence already differ by about 1e-4 of the largest gradient entry
(A_log, dt_bias: sums over every token). Gradients are compared at 1e-3 of each tensor's
largest entry, losses at 1e-5; every negative control misses by far more.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T
from helpers.torch_models import gradients, n_pass_objective
from helpers.torch_rows import NORMALIZATIONS, chat_samples, pack, random_row, token_parents
from torch import nn

import onepass_prep.torch.recurrent as recurrent
from onepass_prep.torch import (
    OnePassCollator,
    build_attention_mask,
    forward_loss,
    install_mask_hook,
    step_denominator,
)
from onepass_prep.torch.layers import check_layers
from onepass_prep.torch.recurrent import RECURRENT_PLAN_KEY, handles, recurrent_plan, tree_conv

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.1)
DELTANET = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                linear_value_head_dim=16, linear_conv_kernel_dim=4)
THREE = dict(num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "linear_attention"])
# Mamba-2 with a 16-token kernel chunk, so the long branch spans several of them.
MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=2, mamba_chunk_size=16,
             mamba_d_conv=4, mamba_expand=1)
NEMOTRON = dict(mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=16,
                conv_kernel=4, head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=32, moe_shared_expert_intermediate_size=32)
CONV = dict(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"])
CONFIGS: dict[str, Callable[[], T.PreTrainedConfig]] = {
    "qwen3_5": lambda: T.Qwen3_5TextConfig(**COMMON, **DELTANET, **THREE, head_dim=16),
    "qwen3_next": lambda: T.Qwen3NextConfig(
        **COMMON, **DELTANET, **THREE, head_dim=16, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=32,
    ),
    "olmo_hybrid": lambda: T.OlmoHybridConfig(**COMMON, **DELTANET, **THREE, pad_token_id=0),
    "kimi_linear": lambda: T.KimiLinearConfig(  # MLA: as many key/value heads as query heads
        **{**COMMON, "num_key_value_heads": 4}, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], kv_lora_rank=16,
        qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, linear_head_dim=16, linear_num_heads=4, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    ),
    "nemotron_h": lambda: T.NemotronHConfig(
        **COMMON, **NEMOTRON, layer_types=["linear_attention", "full_attention", "moe", "linear_attention"],
    ),
    "granite4_hybrid": lambda: T.GraniteMoeHybridConfig(
        **COMMON, **MAMBA, **THREE, num_local_experts=0, shared_intermediate_size=96,
    ),
    "bamba": lambda: T.BambaConfig(**COMMON, **MAMBA, num_hidden_layers=3, attn_layer_indices=[1]),
    "falcon_h1": lambda: T.FalconH1Config(**COMMON, **MAMBA, num_hidden_layers=2, head_dim=16, mamba_d_ssm=64),
    "lfm2": lambda: T.Lfm2Config(**COMMON, **CONV),
    "lfm2_moe": lambda: T.Lfm2MoeConfig(
        **COMMON, **CONV, num_dense_layers=1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    ),
    "nemotron_h_attention_only": lambda: T.NemotronHConfig(
        **COMMON, **NEMOTRON, layer_types=["full_attention", "mlp", "full_attention", "moe"],
    ),
}
FAMILIES = list(CONFIGS)
RECURRENT = [f for f in FAMILIES if f != "nemotron_h_attention_only"]
SCANS = [f for f in RECURRENT if not f.startswith("lfm2")]  # the short convolution has no state
ATTENTION = ["sdpa", "eager", "tree"]


def hybrid(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="sdpa", dtype=torch.float32)


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


def long_and_short_siblings(rng: np.random.Generator) -> list[tuple[list, int]]:
    """A prompt, then a 100-token and a 10-token branch, each with two trained children: the
    two branches fall in different kernel calls (more and fewer than CHUNK tokens), and their
    four children share one call that takes its states from both."""
    prompt = rng.integers(3, VOCAB, size=5).tolist()
    samples = []
    for length in (100, 10):
        branch = rng.integers(3, VOCAB, size=length).tolist()
        for _ in range(2):
            samples.append((prompt + branch + rng.integers(3, VOCAB, size=4).tolist(), len(prompt) + length))
    return samples


def chats() -> list[list[tuple[list, int]]]:
    rng = np.random.default_rng(3)
    return [chat_samples(rng, 3, VOCAB), tool_chain(rng, 3), long_and_short_siblings(rng),
            chat_samples(rng, 4, VOCAB), tool_chain(rng, 2)]


CHATS = chats()
ROWS = [[0, 1, 2], [3, 4]]  # batch of two rows, several conversations packed in each, padded
WEIGHTS = [[1, 0.5, 2], [1, 0, 1.5], [0.25, 1, 0, 2], [1, 1, 0, 3], [2, 1]]


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


class NPass:
    """The untouched model on every N-pass sample alone: all samples in one forward, each in a
    row of its own, padded on the right (causal: no token of a sample sees its padding).
    Called like the model on one sample's ``input_ids``, it answers that sample's logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        samples = [tokens for chat in CHATS for tokens, _ in chat]
        width = max(map(len, samples))
        ids = torch.tensor([tokens + [VOCAB - 1] * (width - len(tokens)) for tokens in samples])
        logits = model(input_ids=ids).logits
        self.logits = {tuple(tokens): logits[i, : len(tokens)] for i, tokens in enumerate(samples)}

    def __call__(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits[tuple(input_ids[0].tolist())][None])


def n_pass_token_losses(model: torch.nn.Module) -> torch.Tensor:
    n_pass = NPass(model)
    losses = []
    for tokens, start in (s for chat in CHATS for s in chat):
        ids = torch.tensor([tokens])
        labels = ids.clone()
        labels[:, :start] = -100
        losses.append(token_losses(n_pass(ids).logits, labels))
    return torch.cat(losses)


def one_pass_inputs(collated: dict) -> dict:
    return {k: v for k, v in collated.items() if k not in ("labels", "loss_weights", "loss_units")}


def assert_gradients_close(got: dict, want: dict) -> None:
    for name, grad in want.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(got[name], grad, rtol=1e-3, atol=1e-3 * scale, msg=name)


@pytest.fixture(scope="module")
def oracle() -> Callable[[str], tuple[torch.nn.Module, torch.Tensor, dict]]:
    """Per family, built once: the pristine model, its N-pass token losses and gradients."""
    cache: dict[str, tuple[torch.nn.Module, torch.Tensor, dict]] = {}

    def get(family: str) -> tuple[torch.nn.Module, torch.Tensor, dict]:
        if family not in cache:
            model = hybrid(family)
            reference = copy.deepcopy(model)
            losses = n_pass_token_losses(reference)
            cache[family] = (model, losses.detach(), gradients(reference, losses.sum()))
        return cache[family]

    return get


@pytest.mark.parametrize("seed", range(3))
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
    rows = [random_row(rng, 12) for _ in range(2)]
    collated = OnePassCollator(pad_to_multiple_of=16)(rows)
    plan = recurrent_plan(collated["subtree_end"])
    total, channels, taps = plan.parents.numel() - 1, 6, 4
    x = torch.randn(total, channels, dtype=torch.float64)
    weight, bias = torch.randn(channels, taps, dtype=torch.float64), torch.randn(channels, dtype=torch.float64)
    got = tree_conv(x, plan.parents, taps, lambda window: F.conv1d(
        window, weight[:, None], bias, padding=taps - 1, groups=channels)[..., : window.shape[-1]])
    for j in range(total):
        path = [j]
        while len(path) < taps and plan.parents[path[-1]] < total:
            path.append(int(plan.parents[path[-1]]))
        sequence = x[path[::-1]].T[None]  # the path as a sequence, root side first
        want = F.conv1d(sequence, weight[:, None], bias, padding=taps - 1, groups=channels)[0, :, len(path) - 1]
        torch.testing.assert_close(got[j], want)




def test_the_batch_hands_states_across_kernel_calls() -> None:
    """The long and short siblings' children run in one call that takes its states from two
    earlier calls, out of their concatenated order: the reordering is exercised."""
    plan = recurrent_plan(batch()["subtree_end"])
    mixed = [g for g in plan.groups if len([s for s, _ in g.sources if s >= 0]) > 1]
    assert any(not torch.equal(g.state_order, torch.arange(len(g.state_order))) for g in mixed)


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_one_pass_equals_n_passes(family: str, attention: str, oracle: Callable) -> None:
    """Per-token losses (as multisets: the tree orders tokens differently) and every gradient."""
    pristine, want, want_gradients = oracle(family)
    model = copy.deepcopy(pristine)
    if attention != "tree":
        model.set_attn_implementation(attention)
    assert handles(model) == (family in RECURRENT)
    install_mask_hook(model, kind="tree" if attention == "tree" else None)
    collated = batch()
    one = token_losses(model(**one_pass_inputs(collated)).logits, collated["labels"])
    torch.testing.assert_close(one.sort().values, want.sort().values, rtol=1e-5, atol=1e-5)
    assert_gradients_close(gradients(model, one.sum()), want_gradients)


@pytest.mark.parametrize("family", RECURRENT)
def test_loss_normalizations_equal_n_pass_objective(family: str, oracle: Callable) -> None:
    """Message weights (0 included) under a normalization (each family one, in turn), through
    forward_loss."""
    normalization = NORMALIZATIONS[RECURRENT.index(family) % len(NORMALIZATIONS)]
    model = copy.deepcopy(oracle(family)[0])
    reference = copy.deepcopy(model)
    install_mask_hook(model)
    collated = batch(normalization, WEIGHTS)
    one = forward_loss(model, collated, step_denominator([collated]))[0]
    want = n_pass_objective(NPass(reference), CHATS, WEIGHTS, normalization)  # type: ignore[arg-type]
    torch.testing.assert_close(one.double(), want, rtol=1e-5, atol=0)
    assert_gradients_close(gradients(model, one), gradients(reference, want))


@pytest.mark.parametrize("family", RECURRENT)
def test_without_the_handover_the_losses_differ(family: str, oracle: Callable) -> None:
    """The row read in order (the mask alone), every chain from a zero state, and every chain's
    convolution without its parent's inputs: each misses the N-pass losses (a convolution
    alone has no state to hand over)."""
    pristine, want, _ = oracle(family)
    want = want.sort().values
    model = copy.deepcopy(pristine)
    handle = install_mask_hook(model)
    collated = batch()
    inputs = one_pass_inputs(collated)

    def losses(call: dict) -> torch.Tensor:
        with torch.no_grad():
            return token_losses(model(**call).logits, collated["labels"]).sort().values

    torch.testing.assert_close(losses(inputs), want, rtol=1e-5, atol=1e-5)  # the full handover
    plan = recurrent_plan(collated["subtree_end"])
    mask = build_attention_mask(model, collated["subtree_end"], position_ids=collated["position_ids"])
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
    controls = {
        "in row order": {**no_hook, "attention_mask": mask},
        "conv cut": {**no_hook, "attention_mask": mask, RECURRENT_PLAN_KEY: cut_conv},
    }
    if family in SCANS:
        controls["zero states"] = {**no_hook, "attention_mask": mask, RECURRENT_PLAN_KEY: zero_states}
    for name, call in controls.items():
        assert missed(losses(call)) > 1e-3, name  # a hundred times the tolerance above


def test_installed_model_runs_plain_calls_as_before() -> None:
    """Without a plan (hook removed: generation, evaluation) the layers run their own forward."""
    for family in ("qwen3_5", "nemotron_h", "lfm2"):
        reference = hybrid(family)
        model = copy.deepcopy(reference)
        install_mask_hook(model).remove()
        ids = torch.tensor([CHATS[0][0][0]])
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen3_next", "bamba"])
def test_gradient_checkpointing(family: str, oracle: Callable) -> None:
    pristine, want, want_gradients = oracle(family)
    model = copy.deepcopy(pristine)
    model.activation_checkpointing_enable()
    model.train()
    install_mask_hook(model)
    collated = batch()
    one = token_losses(model(**one_pass_inputs(collated)).logits, collated["labels"])
    torch.testing.assert_close(one.sort().values, want.sort().values, rtol=1e-5, atol=1e-5)
    assert_gradients_close(gradients(model, one.sum()), want_gradients)


class UnknownMixer(nn.Module):
    """A mixer no adapter knows: a causal convolution over the row."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(width, width, 4, groups=width, padding=3)

    def forward(self, hidden_states: torch.Tensor, **_: object) -> torch.Tensor:
        return self.conv1d(hidden_states.transpose(1, 2))[..., : hidden_states.shape[1]].transpose(1, 2)


REASON = (
    "; only full, sliding-window and chunked attention layers can be made exact by a mask (a layer "
    "that reads the row in order carries one branch's state into its sibling); train this model "
    "the usual N-pass way, one sample per sequence"
)
REFUSED: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "unknown": (lambda: _with_unknown_mixer(), (
        "Qwen3_5ForCausalLM cannot train on tree rows exactly: layers linear_attention (runs UnknownMixer, "
        "which reads the row in order and no adapter drives)")),
    "jamba": (lambda: T.AutoModelForCausalLM.from_config(T.JambaConfig(
        **COMMON, num_hidden_layers=2, attn_layer_offset=1, attn_layer_period=2, expert_layer_period=2,
        num_experts=2, mamba_d_state=8, mamba_expand=1,
    )), (
        "JambaForCausalLM cannot train on tree rows exactly: layers linear_attention (runs JambaMambaMixer, "
        "which reads the row in order: its selective scan (transformers' mamba_selective_scan) takes no "
        "initial state, so a branch cannot start from its parent's state)")),
    "minimax": (lambda: T.AutoModelForCausalLM.from_config(T.MiniMaxConfig(
        **COMMON, num_hidden_layers=2, head_dim=16, num_local_experts=2,
        layer_types=["linear_attention", "full_attention"],
    )), (
        "MiniMaxForCausalLM cannot train on tree rows exactly: layers linear_attention (runs "
        "MiniMaxLightningAttention, which reads the row in order: its lightning attention runs the block "
        "recurrence inside the layer's forward, with no kernel that takes an initial state)")),
}


def _with_unknown_mixer() -> nn.Module:
    model = hybrid("qwen3_5")
    model.model.layers[0].linear_attn = UnknownMixer(64)
    return model


@pytest.mark.parametrize("name", REFUSED)
def test_mixers_no_adapter_drives_are_refused(name: str) -> None:
    build, message = REFUSED[name]
    model = build()
    with pytest.raises(ValueError) as refused:
        install_mask_hook(model)
    assert str(refused.value) == message + REASON
    assert not model._forward_pre_hooks


def test_only_models_with_driven_mixers_get_the_tree_forward() -> None:
    llama = T.AutoModelForCausalLM.from_config(T.LlamaConfig(**COMMON, num_hidden_layers=2, head_dim=16))
    assert not handles(llama)
    with pytest.raises(ValueError, match="no tree forward for the recurrent layers of this model"):
        recurrent.install_tree_recurrence(llama)


def test_verdicts_name_each_mixer(oracle: Callable) -> None:
    got = {family: sorted({k.describe() for k in check_layers(oracle(family)[0])}) for family in
           ("olmo_hybrid", "nemotron_h", "falcon_h1", "lfm2")}
    assert got == {
        "olmo_hybrid": ["Gated DeltaNet, each chain from its parent's state", "full attention"],
        "nemotron_h": ["Mamba-2, each chain from its parent's state", "full attention",
                       "no mixing across positions"],
        "falcon_h1": ["full attention beside Mamba-2, each chain from its parent's state"],
        "lfm2": ["full attention", "short convolution, each chain from its parent's state"],
    }


def test_lara_mini_mask_mapping_holds_its_linear_layers() -> None:
    """LaraMini looks every layer's mask up in the mapping by its type, its "linear_attention"
    layers too (a KeyError before the hook gave that key None), and runs sliding-window layers
    beside Gated DeltaNet ones: per-token losses equal N passes under sdpa and tree attention
    (gradients of the same mixer and windows are checked for the families above)."""
    torch.manual_seed(0)
    config = T.LaraMiniConfig(
        **COMMON, **{**DELTANET, "linear_num_value_heads": 2}, num_hidden_layers=3, head_dim=16, sliding_window=8,
        num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        layer_types=["linear_attention", "sliding_attention", "full_attention"],
    )
    pristine = T.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    collated = batch()
    with torch.no_grad():
        want = n_pass_token_losses(pristine)
        mask = build_attention_mask(pristine, collated["subtree_end"], position_ids=collated["position_ids"])
        assert isinstance(mask, dict) and mask["linear_attention"] is None
        for kind in (None, "tree"):
            model = copy.deepcopy(pristine)
            install_mask_hook(model, kind=kind)
            one = token_losses(model(**one_pass_inputs(collated)).logits, collated["labels"])
            torch.testing.assert_close(one.sort().values, want.sort().values, rtol=1e-5, atol=1e-5)
