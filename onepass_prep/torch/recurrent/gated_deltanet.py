"""Gated DeltaNet (Qwen3.5, Qwen3.5-MoE, Qwen3-Next, OLMo hybrid): a causal convolution over
the projected queries, keys and values, then the gated delta rule.

A padded step (zero key, decay and beta) leaves the delta rule's state as it is. The three
projection layouts transformers has (Qwen3-Next's fused qkvz and ba, Qwen3.5's qkv, z, b, a,
OLMo's separate q, k, v, a, b and gate) are told apart by their submodules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .mixer import Mixer, has, kernels, modeling
from .schedule import RecurrentPlan, run_chains, tree_conv

# Per projection layout: the submodules that mark it.
_QWEN3_NEXT = ("in_proj_qkvz", "in_proj_ba", "fix_query_key_value_ordering")
_QWEN3_5 = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
_OLMO = ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_norm", "o_proj")
_CORE = ("conv1d", "A_log", "dt_bias", "head_k_dim", "head_v_dim", "key_dim", "value_dim", "activation")


def drives(module: nn.Module) -> bool:
    return (
        has(module, *_CORE) and isinstance(module.conv1d, nn.Conv1d)
        and (has(module, *_QWEN3_NEXT, "norm", "out_proj") or has(module, *_QWEN3_5, "norm", "out_proj")
             or has(module, *_OLMO))
        and kernels(module, "torch_chunk_gated_delta_rule", "causal_conv1d_forward")
    )


def _projections(layer: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The convolution's input, the output gate, beta's and the decay's logits, as the layer's
    forward computes them."""
    batch, length, _ = hidden.shape
    if has(layer, *_QWEN3_NEXT):
        query, key, value, z, b, a = layer.fix_query_key_value_ordering(
            layer.in_proj_qkvz(hidden), layer.in_proj_ba(hidden)
        )
        mixed = torch.cat([x.reshape(batch, length, -1) for x in (query, key, value)], -1)
        return mixed, z, b, a
    if has(layer, *_QWEN3_5):
        z = layer.in_proj_z(hidden).reshape(batch, length, -1, layer.head_v_dim)
        return layer.in_proj_qkv(hidden), z, layer.in_proj_b(hidden), layer.in_proj_a(hidden)
    mixed = torch.cat([layer.q_proj(hidden), layer.k_proj(hidden), layer.v_proj(hidden)], -1)
    return mixed, layer.g_proj(hidden), layer.b_proj(hidden), layer.a_proj(hidden)


def tree_forward(layer: Any, hidden_states: torch.Tensor, plan: RecurrentPlan) -> torch.Tensor:
    batch, length, _ = hidden_states.shape
    tokens = batch * length
    code = modeling(layer)
    mixed, gate, b, a = _projections(layer, hidden_states)
    mixed = tree_conv(mixed.flatten(0, 1), plan.parents, layer.conv1d.kernel_size[0], lambda window: (
        code.causal_conv1d_forward(layer.conv1d, window, None, layer.layer_idx, activation=layer.activation)))
    query, key, value = torch.split(mixed, [layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
    query = query.reshape(tokens, -1, layer.head_k_dim)
    key = key.reshape(tokens, -1, layer.head_k_dim)
    value = value.reshape(tokens, -1, layer.head_v_dim)
    beta = b.reshape(tokens, -1).sigmoid()
    if getattr(layer, "allow_neg_eigval", False):
        beta = beta * 2.0
    g = -layer.A_log.float().exp() * nn.functional.softplus(a.reshape(tokens, -1).float() + layer.dt_bias)

    def scan(inputs: list[torch.Tensor], initial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v, decay, bt = inputs
        return code.torch_chunk_gated_delta_rule(q, k, v, g=decay, beta=bt, initial_state=initial,
                                                 output_final_state=True, use_qk_l2norm_in_kernel=True)

    zero = torch.zeros((value.shape[1], key.shape[-1], value.shape[-1]), dtype=torch.float32, device=value.device)
    core = run_chains(scan, [query, key, value, g, beta], zero, plan)
    norm, out = (layer.o_norm, layer.o_proj) if has(layer, *_OLMO) else (layer.norm, layer.out_proj)
    core = norm(core.reshape(-1, layer.head_v_dim), gate.reshape(-1, layer.head_v_dim))
    return out(core.reshape(batch, length, -1))


MIXER = Mixer("Gated DeltaNet", drives, tree_forward)
