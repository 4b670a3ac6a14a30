"""Mamba-2 (Nemotron-H, Granite 4 hybrid, Bamba, Falcon-H1): a causal convolution over the
projected x, B and C, then the chunked state-space scan (``mamba2_chunk_scan``, mamba_ssm's
``mamba_chunk_scan_combined`` where installed).

The time step goes to the scan already biased, softplus-ed and clamped, as the kernel itself
would make it (``dt_softplus``, ``dt_limit``): a padded step then has a zero time step, which
leaves the state as it is (a raw zero would still decay it by ``softplus(dt_bias)``).
Falcon-H1's multipliers (``ssm_in_multiplier``, ``mup_vector``) and its optional gated norm
are read from the module, as its forward reads them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .mixer import Mixer, has, kernels, modeling
from .schedule import RecurrentPlan, run_chains, tree_conv

_PARTS = (
    "in_proj", "conv1d", "A_log", "D", "dt_bias", "norm", "out_proj", "num_heads", "head_dim", "n_groups",
    "ssm_state_size", "intermediate_size", "conv_dim", "chunk_size", "time_step_limit", "activation",
)


def drives(module: nn.Module) -> bool:
    return (
        has(module, *_PARTS) and isinstance(module.conv1d, nn.Conv1d)
        and kernels(module, "mamba2_chunk_scan", "causal_conv1d_forward")
    )


def tree_forward(layer: Any, hidden_states: torch.Tensor, plan: RecurrentPlan) -> torch.Tensor:
    batch, length, _ = hidden_states.shape
    code = modeling(layer)
    if hasattr(layer, "ssm_in_multiplier"):
        hidden_states = hidden_states * layer.ssm_in_multiplier
    projected = layer.in_proj(hidden_states)
    if hasattr(layer, "mup_vector"):
        projected = projected * layer.mup_vector
    gate, xbc, dt = projected.split([layer.intermediate_size, layer.conv_dim, layer.num_heads], dim=-1)
    xbc = tree_conv(xbc.flatten(0, 1), plan.parents, layer.conv1d.kernel_size[0], lambda window: (
        code.causal_conv1d_forward(layer.conv1d, window, None, layer.layer_idx, activation=layer.activation)))
    groups = layer.n_groups * layer.ssm_state_size
    x, b, c = torch.split(xbc, [layer.intermediate_size, groups, groups], dim=-1)
    dt = nn.functional.softplus(dt.flatten(0, 1) + layer.dt_bias.to(dt.dtype)).clamp(*layer.time_step_limit)
    a = -torch.exp(layer.A_log.float())

    def scan(inputs: list[torch.Tensor], initial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs, dts, bs, cs = inputs
        chains, width = xs.shape[:2]
        return code.mamba2_chunk_scan(
            xs.view(chains, width, layer.num_heads, layer.head_dim), dts, a,
            bs.view(chains, width, layer.n_groups, layer.ssm_state_size),
            cs.view(chains, width, layer.n_groups, layer.ssm_state_size),
            chunk_size=layer.chunk_size, D=layer.D, initial_states=initial, return_final_states=True,
        )

    zero = torch.zeros((layer.num_heads, layer.head_dim, layer.ssm_state_size), dtype=torch.float32,
                       device=x.device)
    out = run_chains(scan, [x, dt, b, c], zero, plan).reshape(batch, length, layer.intermediate_size)
    if getattr(layer, "mamba_rms_norm", True):
        out = layer.norm(out, gate)
    else:
        out = out * nn.functional.silu(gate)
    return layer.out_proj(out.to(hidden_states.dtype))


MIXER = Mixer("Mamba-2", drives, tree_forward)
