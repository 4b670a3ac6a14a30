"""A gated short convolution (LFM2, LFM2-MoE): ``out_proj(C * conv(B * x))``, no scan; each
token's convolution reads its ancestors' ``B * x``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .mixer import Mixer, has, kernels, modeling
from .schedule import RecurrentPlan, tree_conv


def drives(module: nn.Module) -> bool:
    return (
        has(module, "conv", "in_proj", "out_proj", "layer_idx") and not has(module, "A_log")
        and isinstance(module.conv, nn.Conv1d) and isinstance(module.in_proj, nn.Linear)
        and module.in_proj.out_features == 3 * module.conv.in_channels
        and kernels(module, "causal_conv1d_forward")
    )


def tree_forward(layer: Any, hidden_states: torch.Tensor, plan: RecurrentPlan) -> torch.Tensor:
    code = modeling(layer)
    b, c, x = layer.in_proj(hidden_states).chunk(3, dim=-1)
    mixed = tree_conv((b * x).flatten(0, 1), plan.parents, layer.conv.kernel_size[0], lambda window: (
        code.causal_conv1d_forward(layer.conv, window, None, layer.layer_idx)))
    return layer.out_proj(c * mixed.reshape(c.shape))


MIXER = Mixer("short convolution", drives, tree_forward)
