"""Every architecture a user may train: one pass == N separate passes, per token and per gradient.

Tiny random-weight models from transformers' own config classes cover full attention (Qwen3,
Llama, DeepSeek-V3's MLA, MoE, SmolLM3's NoPE layers), sliding windows (on every layer, on
some layers, alternating; Gemma 2's logit softcapping, gpt-oss's attention sinks) and Llama 4's
chunked attention. Windows and chunks (5 and 6 tokens) are far shorter than the rows (two rows,
three and two conversations packed, padded). The oracle runs the unmodified model (eager, its
own masks) on each N-pass sample; the one-pass side goes through ``install_mask_hook`` with
each attention implementation transformers offers for the model. Per-token losses are matched
by (context, target), so a token is compared with itself. Flex runs forward only: its backward
needs the compiled GPU kernel (test_torch_flex.py); its window block tables are checked tile by
tile against create_block_mask instead. Tree attention holds windows and chunks in its plan and
refuses softcapping and sinks with what to use. Hybrid models (recurrent mixers) are in
test_torch_hybrid.py; here a mixer is found from the modules even where the config says
attention, and one tree mask shared by every layer (what the hook did before) is shown to
fail the window models, so the matrix would catch it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import cache

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from helpers.torch_models import workload
from helpers.torch_rows import IGNORE, reference_visible

from onepass_prep.torch import OnePassCollator, bool_mask, install_mask_hook
from onepass_prep.torch.layers import check_layers
from onepass_prep.torch.tree_attention import TREE_ATTENTION

SIZE = dict(
    vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, initializer_range=0.3, pad_token_id=0,
)
FOUR = {**SIZE, "num_hidden_layers": 4}
WINDOW, CHUNK = 5, 6
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

# name -> (config, the layer kinds the model must be read as)
ARCHITECTURES: dict[str, tuple[Callable[[], T.PreTrainedConfig], list[str]]] = {
    "qwen3": (lambda: T.Qwen3Config(**SIZE), ["full"] * 2),
    "llama": (lambda: T.LlamaConfig(**SIZE), ["full"] * 2),
    "deepseek_v3_mla_moe": (lambda: T.DeepseekV3Config(
        **{**SIZE, "head_dim": None, "num_key_value_heads": 4}, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1,
    ), ["full"] * 2),
    "qwen3_moe": (lambda: T.Qwen3MoeConfig(**SIZE, **MOE), ["full"] * 2),
    "smollm3_nope": (lambda: T.SmolLM3Config(**FOUR, no_rope_layer_interval=2), ["full"] * 4),
    "mistral_window_every_layer": (lambda: T.MistralConfig(**SIZE, sliding_window=WINDOW), ["sliding"] * 2),
    "qwen2_max_window_layers": (lambda: T.Qwen2Config(
        **FOUR, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2,
    ), ["full", "full", "sliding", "sliding"]),
    "phi3_window": (lambda: T.Phi3Config(**SIZE, sliding_window=WINDOW), ["sliding"] * 2),
    "gemma2_softcap": (lambda: T.Gemma2Config(
        **SIZE, sliding_window=WINDOW, attn_logit_softcapping=5.0, final_logit_softcapping=10.0,
    ), ["sliding", "full"]),
    "gemma3": (lambda: T.Gemma3TextConfig(**FOUR, sliding_window=WINDOW, sliding_window_pattern=2),
               ["sliding", "full"] * 2),
    "gpt_oss_sinks": (lambda: T.GptOssConfig(
        **SIZE, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
    ), ["sliding", "full"]),
    "olmo3": (lambda: T.Olmo3Config(**FOUR, sliding_window=WINDOW), ["sliding"] * 3 + ["full"]),
    "cohere2": (lambda: T.Cohere2Config(**FOUR, sliding_window=WINDOW), ["sliding"] * 3 + ["full"]),
    "exaone4": (lambda: T.Exaone4Config(**FOUR, sliding_window=WINDOW, sliding_window_pattern=2),
                ["sliding", "full"] * 2),
    "llama4_chunked": (lambda: T.Llama4TextConfig(
        **FOUR, attention_chunk_size=CHUNK, num_local_experts=2, intermediate_size_mlp=64,
        interleave_moe_layer_step=2,
    ), ["chunked"] * 3 + ["full"]),
}
WINDOWED = [name for name, (_, kinds) in ARCHITECTURES.items() if set(kinds) != {"full"}]
IMPLEMENTATIONS = ["sdpa", "eager", "flex_attention", TREE_ATTENTION]


def build(name: str, implementation: str) -> torch.nn.Module:
    """The architecture's model with the oracle's weights (or pytest.skip where transformers
    does not offer the implementation for it)."""
    config = ARCHITECTURES[name][0]()
    try:
        model = T.AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    except ValueError as error:
        if "does not support" not in str(error):
            raise
        pytest.skip(f"transformers does not offer {implementation!r} for {name}")
    model.load_state_dict(oracle(name)[0].state_dict())
    return model


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per labelled token (row order), the cross-entropy of predicting it at the previous token."""
    per = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none")
    return per[labels[:, 1:] != IGNORE]


@cache
def rows_and_keys() -> tuple[list, dict, list[tuple]]:
    """The workload (five chats, two rows, padded), and each labelled row token's (context,
    target) from the FORMAT.md rule: its context is what its previous token sees, in order."""
    samples, batch = workload()
    rows = _rows()
    keys = []
    for b, row in enumerate(rows):
        spec = row["mask_spec"]
        visible = reference_visible(spec["seg_lens"], spec["seg_parents"])
        ids = row["input_ids"]
        for j, label in enumerate(row["labels"]):
            if label != IGNORE:
                context = tuple(ids[k] for k in range(j) if visible[j - 1, k])
                keys.append((b, context, label))
    keys.sort(key=lambda key: key[0])  # token_losses lists row 0's tokens, then row 1's
    return samples, batch, [(context, target) for _, context, target in keys]


def _rows() -> list[dict]:
    """The rows workload() collates (rebuilt: workload returns the collated batch only)."""
    import numpy as np
    from helpers.torch_rows import chat_samples, pack

    rng = np.random.default_rng(0)
    chats = [chat_samples(rng, turns) for turns in (3, 1, 4, 2, 3)]
    rows = [pack(chats[:3], ["a", "b", "c"]), pack(chats[3:], ["d", "e"])]
    assert torch.equal(OnePassCollator(pad_to_multiple_of=64)(rows)["input_ids"], workload()[1]["input_ids"])
    return rows


@cache
def oracle(name: str) -> tuple[torch.nn.Module, dict[tuple, float], dict[str, torch.Tensor]]:
    """N separate passes of the unmodified eager model: per-token losses by (context, target)
    and every parameter's gradient of their sum."""
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(ARCHITECTURES[name][0](), attn_implementation="eager")
    samples, _, _ = rows_and_keys()
    losses: dict[tuple, float] = {}
    total = torch.zeros(())
    for tokens, start in samples:
        ids = torch.tensor([tokens])
        labels = ids.clone()
        labels[:, :start] = IGNORE
        per = token_losses(model(input_ids=ids).logits, labels)
        for t, loss in zip(range(start, len(tokens)), per.tolist(), strict=True):
            losses[(tuple(tokens[:t]), tokens[t])] = loss
        total = total + per.sum()
    model.zero_grad()
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return model, losses, grads


def one_pass(model: torch.nn.Module, backward: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    _, batch, _ = rows_and_keys()
    with torch.set_grad_enabled(backward):
        per = token_losses(model(**batch).logits, batch["labels"])
    grads = {}
    if backward:
        model.zero_grad()
        per.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return per, grads


def expected_losses(name: str) -> torch.Tensor:
    _, losses, _ = oracle(name)
    _, _, keys = rows_and_keys()
    assert len(keys) == len(losses)  # every N-pass trained token is in the rows once
    return torch.tensor([losses[key] for key in keys])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_one_pass_equals_n_passes(name: str, implementation: str) -> None:
    tree = implementation == TREE_ATTENTION
    model = build(name, "eager" if tree else implementation)
    assert [k.attention for k in check_layers(model)] == ARCHITECTURES[name][1]
    if tree and name == "gemma2_softcap":
        with pytest.raises(ValueError) as refused:
            install_mask_hook(model, kind="tree")
        assert str(refused.value) == (
            "'onepass_tree' attention has no logit softcapping, and Gemma2ForCausalLM caps its "
            "attention logits at 5.0: use install_mask_hook(model) with attn_implementation "
            "'eager' or 'flex_attention'"
        )
        return
    if implementation == "flex_attention" and name == "gpt_oss_sinks" and not torch.cuda.is_available():
        pytest.skip("transformers runs attention sinks under flex on CUDA only")
    if tree and name == "gpt_oss_sinks":
        install_mask_hook(model, kind="tree")
        with pytest.raises(ValueError, match=r"no attention sinks \(s_aux\): use attn_implementation 'eager'"):
            one_pass(model, backward=False)
        return
    install_mask_hook(model, kind="tree" if tree else None)
    backward = implementation != "flex_attention"  # flex's backward: GPU kernel only
    got, grads = one_pass(model, backward)
    torch.testing.assert_close(got, expected_losses(name), rtol=1e-5, atol=1e-5)
    for param, grad in oracle(name)[2].items():
        if backward:
            scale = float(grad.abs().max())
            torch.testing.assert_close(grads[param], grad, rtol=1e-4, atol=1e-5 * scale, msg=param)


@pytest.mark.parametrize("name", WINDOWED)
def test_one_tree_mask_for_every_layer_is_wrong_for_window_models(name: str) -> None:
    """The negative control: the tree mask alone (the hook before per-layer masks) misses the
    window, and the matrix above sees it."""
    model = build(name, "eager")
    _, batch, _ = rows_and_keys()
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    mask = torch.zeros(bool_mask(batch["subtree_end"]).shape).masked_fill_(
        ~bool_mask(batch["subtree_end"]), torch.finfo(torch.float32).min
    )
    got = token_losses(model(**inputs, attention_mask=mask).logits, batch["labels"])
    assert (got - expected_losses(name)).abs().max() > 1e-2


def test_windowed_masks_are_built_once_per_layer_type(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma 3 (four layers, two types): two masks per call, handed over by layer type."""
    import onepass_prep.torch.hook as hook_module

    built = []
    real = hook_module.bool_mask
    monkeypatch.setattr(hook_module, "bool_mask", lambda *a, **k: built.append(a) or real(*a, **k))
    model = build("gemma3", "sdpa")
    install_mask_hook(model)
    _, batch, _ = rows_and_keys()
    seen = []
    model.model.register_forward_pre_hook(lambda m, a, k: seen.append(k["attention_mask"]), with_kwargs=True)
    model(**batch)
    assert len(built) == 2 and set(seen[0]) == {"sliding_attention", "full_attention"}


REASON = (
    "; only full, sliding-window and chunked attention layers can be made exact by a mask (a layer "
    "that reads the row in order carries one branch's state into its sibling); train this model "
    "the usual N-pass way, one sample per sequence"
)


def test_a_state_space_mixer_is_found_even_where_the_config_says_attention(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Falcon-H1's mixer runs beside the attention of every layer: were its config to call
    the layers full attention, the modules still decide (the mixer is run from each chain's
    parent state, tests/torch/test_torch_hybrid.py; a mixer no adapter drives is refused there)."""
    monkeypatch.setattr(
        T.FalconH1Config, "layers_block_type", property(lambda self: ["full_attention"] * self.num_hidden_layers)
    )
    model = T.AutoModelForCausalLM.from_config(T.FalconH1Config(
        **SIZE, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_expand=1,
    ))
    kinds = {(kind.layer_type, kind.attention, kind.mixer) for kind in check_layers(model)}
    assert kinds == {("full_attention", "full", "Mamba-2")}


def _with_layer_types(config: T.PreTrainedConfig, layer_types: list[str]) -> T.PreTrainedConfig:
    config.layer_types = layer_types  # the constructor only takes the types it knows today
    return config


@pytest.mark.parametrize("config, message", [
    (lambda: T.GPTNeoConfig(vocab_size=512, hidden_size=32, num_layers=2, num_heads=4,
                            attention_types=[[["global", "local"], 1]], window_size=WINDOW),
     "GPTNeoForCausalLM cannot train on tree rows exactly: layers a layer (config field "
     "attention_types=[[['global', 'local'], 1]], a mask onepass-prep does not know)"),
    (lambda: _with_layer_types(T.Qwen3Config(**SIZE), ["full_attention", "gated_attention"]),
     "Qwen3ForCausalLM cannot train on tree rows exactly: layers gated_attention (a layer type "
     "onepass-prep does not know)"),
    (lambda: T.MoshiConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64),
     "MoshiForCausalLM cannot train on tree rows exactly: layers a layer (sliding_window=3000 in the "
     "config, yet transformers.models.moshi.modeling_moshi builds no sliding-window mask "
     "(create_sliding_window_causal_mask): which window the model applies is unknown)"),
])
def test_unknown_masks_and_layer_types_are_refused(config: Callable, message: str) -> None:
    """A window field or a layer type it does not know, or a window the model's code never
    builds a mask for (Moshi; Mistral and Phi-3 above build theirs): refused, never trained
    wrong."""
    model = T.AutoModelForCausalLM.from_config(config())
    with pytest.raises(ValueError) as refused:
        install_mask_hook(model)
    assert str(refused.value) == message + REASON


def test_llama4_temperature_tuning_refuses_rows_past_its_floor_scale() -> None:
    """Llama 4's NoPE layers scale queries by the row index: exact only below floor_scale."""
    config = ARCHITECTURES["llama4_chunked"][0]()
    config.floor_scale = 64
    model = T.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    install_mask_hook(model)
    _, batch, _ = rows_and_keys()
    assert batch["input_ids"].shape[1] > 63
    with pytest.raises(ValueError, match=r"floor_scale - 1 = 63 tokens; convert with --max-seq-len 63"):
        model(**batch)


TABLES = (
    "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
    "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
)


@pytest.mark.parametrize("window, chunk", [(5, None), (100, None), (130, None), (None, 7), (None, 200)])
@pytest.mark.parametrize("block_size", [16, 128])
def test_window_block_tables_equal_create_block_mask_tile_by_tile(window, chunk, block_size: int) -> None:
    """Flex's BlockMask for a window or chunked layer: the tables create_block_mask derives
    from the dense rule (FORMAT.md tree rule, and p[q] - p[kv] < W or the same chunk of C,
    written here from the definition), and mask_mod equal to that rule on every pair."""
    import numpy as np
    from helpers.torch_rows import make_row, random_row
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    from onepass_prep.torch import block_mask
    from onepass_prep.torch.masks import key_limits

    rng = np.random.default_rng(block_size + (window or 0) + (chunk or 0))
    chain = make_row(rng.integers(0, 500, 700).tolist(), [IGNORE] * 700, [300, 200, 200], [-1, 0, 0])
    rows = [random_row(rng, 40), random_row(rng, 300), chain, random_row(rng, 1)]
    batch = OnePassCollator(pad_to_multiple_of=16)(rows)
    length = batch["input_ids"].shape[1]
    rule = torch.zeros(len(rows), length, length, dtype=torch.bool)
    for b, row in enumerate(rows):
        n, p = row["num_tokens"], torch.tensor(row["position_ids"])
        near = (p[:, None] - p[None, :] < window) if window else (p[:, None] // chunk == p[None, :] // chunk)
        spec = row["mask_spec"]
        rule[b, :n, :n] = torch.from_numpy(reference_visible(spec["seg_lens"], spec["seg_parents"])) & near
        rule[b, range(n, length), range(n, length)] = True
    limit = key_limits(batch["position_ids"], window, chunk)
    mine = block_mask(batch["subtree_end"], block_size, batch["position_ids"], limit)
    theirs = create_block_mask(lambda b, h, q, kv: rule[b, q, kv], len(rows), None, length, length,
                               device="cpu", BLOCK_SIZE=block_size)
    for name in TABLES:
        assert torch.equal(getattr(mine, name), getattr(theirs, name)), name
    assert torch.equal(create_mask(mine.mask_mod, len(rows), 1, length, length, device="cpu")[:, 0], rule)


ROW_INDEX_ATTENTION = {
    "bart": (lambda: T.BartConfig(
        vocab_size=512, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
    ), "BartForCausalLM cannot train on tree rows exactly: layers a layer (attention whose positions "
       "come from the row index, not position_ids)"),
    "mpt": (lambda: T.MptConfig(vocab_size=512, d_model=32, n_heads=4, n_layers=2),
            "MptForCausalLM cannot train on tree rows exactly: layers a layer (ALiBi attention, whose "
            "biases come from the row index, not position_ids)"),
    "falcon_alibi": (lambda: T.FalconConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True,
    ), "FalconForCausalLM cannot train on tree rows exactly: layers a layer (ALiBi attention, whose "
       "biases come from the row index, not position_ids)"),
    "bert": (lambda: T.BertConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    ), "BertLMHeadModel cannot train on tree rows exactly: layers a layer (bidirectional "
       "self-attention, is_causal false: a decoder needs is_decoder=True)"),
}


@pytest.mark.parametrize("name", ROW_INDEX_ATTENTION)
def test_attention_a_mask_cannot_fix_is_refused(name: str) -> None:
    """Attention the config calls full that still differs from N passes: positions from the
    row index (BART's decoder takes no position_ids), ALiBi, or a BERT built bidirectional."""
    config, message = ROW_INDEX_ATTENTION[name]
    model = T.AutoModelForCausalLM.from_config(config(), attn_implementation="eager")
    with pytest.raises(ValueError) as refused:
        install_mask_hook(model)
    assert str(refused.value) == message + REASON


def test_a_bert_decoder_and_whisper_are_let_through() -> None:
    """BERT built as a decoder is causal and reads position_ids; Whisper's causal LM takes them
    through its decoder: neither is refused."""
    bert = T.BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, is_decoder=True)
    whisper = T.WhisperConfig(vocab_size=512, d_model=32, encoder_layers=2, decoder_layers=2,
                              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                              decoder_ffn_dim=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              decoder_start_token_id=1)
    for config in (bert, whisper):
        model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        assert {kind.attention for kind in check_layers(model)} == {"full"}
