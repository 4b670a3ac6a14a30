"""Kimi Delta Attention (Kimi Linear): Gated DeltaNet with a per-channel decay. A causal
convolution over the projected queries, keys and values, then ``chunk_kimi_delta_attention``
(flash-linear-attention's ``chunk_kda`` where installed). A padded step (zero key, decay and
beta) leaves the state as it is."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .mixer import Mixer, has, kernels, modeling
from .schedule import RecurrentPlan, run_chains, tree_conv

_PARTS = ("q_proj", "k_proj", "v_proj", "conv1d", "forget_gate", "b_proj", "g_a_proj", "g_b_proj", "o_norm",
          "o_proj", "head_dim", "qkv_dim", "activation", "layer_idx")


def drives(module: nn.Module) -> bool:
    return (
        has(module, *_PARTS) and isinstance(module.conv1d, nn.Conv1d)
        and kernels(module, "chunk_kimi_delta_attention", "causal_conv1d_forward")
    )


def tree_forward(layer: Any, hidden_states: torch.Tensor, plan: RecurrentPlan) -> torch.Tensor:
    batch, length, _ = hidden_states.shape
    tokens = batch * length
    code = modeling(layer)
    mixed = torch.cat([layer.q_proj(hidden_states), layer.k_proj(hidden_states), layer.v_proj(hidden_states)], -1)
    mixed = tree_conv(mixed.flatten(0, 1), plan.parents, layer.conv1d.kernel_size[0], lambda window: (
        code.causal_conv1d_forward(layer.conv1d, window, None, layer.layer_idx, activation=layer.activation)))
    query, key, value = (x.reshape(tokens, -1, layer.head_dim) for x in torch.split(mixed, [layer.qkv_dim] * 3, -1))
    g = layer.forget_gate(hidden_states).flatten(0, 1)
    beta = torch.sigmoid(layer.b_proj(hidden_states)).flatten(0, 1)

    def scan(inputs: list[torch.Tensor], initial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v, decay, b = inputs
        return code.chunk_kimi_delta_attention(q, k, v, g=decay, beta=b, initial_state=initial,
                                               output_final_state=True, use_qk_l2norm_in_kernel=True)

    zero = torch.zeros((value.shape[1], layer.head_dim, layer.head_dim), dtype=torch.float32, device=value.device)
    core = run_chains(scan, [query, key, value, g, beta], zero, plan).reshape(batch, length, -1, layer.head_dim)
    gate = layer.g_b_proj(layer.g_a_proj(hidden_states)).view(batch, length, -1, layer.head_dim)
    return layer.o_proj(layer.o_norm(core, gate).reshape(batch, length, -1))


MIXER = Mixer("Kimi Delta Attention", drives, tree_forward)
