"""Recurrent mixers over a tree row: every chain of tokens starts from its parent's state.

A recurrent mixer (Gated DeltaNet, Kimi Delta Attention, Mamba-2, a short convolution) reads the row in order: a
short causal convolution over projected inputs, then (except a bare convolution) a scan whose
state runs from token to token. In a tree row a branch would read the state its sibling left,
which no mask can stop. It is exact instead when every token's convolution sees the inputs of
its own ancestors and every chain of tokens starts the scan from the state its parent token
ended with. schedule.py holds that schedule, the same for every mixer; one small adapter per
mixer kind (gated_deltanet.py, kimi_delta.py, mamba2.py, short_conv.py) says how to call that kind's
projections, convolution and scan.

Which module an adapter drives is decided by its structure (the submodules, parameters and
kernel functions its forward uses), never by a model name. The layer's own code runs as it is
(projections, norms, output) and so do its kernels, looked up in the layer's modeling module
where transformers binds the fast ones (flash-linear-attention, mamba_ssm, causal-conv1d) when
installed: a GPU run takes the path the CPU tests check. Only calls that carry a plan take the
tree forward; without one the layer runs its original forward, so an installed model generates
as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import gated_deltanet, kimi_delta, mamba2, short_conv
from .mixer import Mixer, modeling
from .schedule import (
    CHUNK,
    Group,
    RecurrentPlan,
    ancestor_windows,
    recurrent_plan,
    run_chains,
    tree_conv,
)

if TYPE_CHECKING:  # the runtime does not import transformers
    from transformers import PreTrainedModel

__all__ = [
    "CHUNK", "MIXERS", "RECURRENT_PLAN_KEY", "Group", "Mixer", "RecurrentPlan", "ancestor_windows",
    "handles", "install_tree_recurrence", "mixer_for", "recurrent_mixers", "recurrent_plan",
    "run_chains", "tree_conv", "unsupported",
]

RECURRENT_PLAN_KEY = "onepass_recurrent_plan"
MIXERS: tuple[Mixer, ...] = (gated_deltanet.MIXER, kimi_delta.MIXER, mamba2.MIXER, short_conv.MIXER)


def mixer_for(module: nn.Module) -> Mixer | None:
    """The adapter that drives ``module``, if any."""
    return next((mixer for mixer in MIXERS if mixer.drives(module)), None)


def recurrent_mixers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that an adapter drives."""
    return [module for module in model.modules() if mixer_for(module) is not None]


def handles(model: nn.Module) -> bool:
    """Whether ``model`` has recurrent mixers this package runs on tree rows (layers.py checks
    that no other layer reads the row in order)."""
    return bool(recurrent_mixers(model))


@dataclass(frozen=True)
class _Missing:
    """What a recurrent mixer without an adapter lacks, recognized by a kernel function of its
    modeling module or an attribute of the module."""

    marker: str
    reason: str


_MISSING = (
    _Missing("mamba_selective_scan", "its selective scan (transformers' mamba_selective_scan) takes no "
             "initial state, so a branch cannot start from its parent's state"),
    _Missing("slope_rate", "its lightning attention runs the block recurrence inside the layer's "
             "forward, with no kernel that takes an initial state"),
)


def unsupported(module: nn.Module) -> str:
    """Why ``module``, a mixer that reads the row in order, has no tree forward."""
    namespace = vars(modeling(module))
    for missing in _MISSING:
        if missing.marker in namespace or hasattr(module, missing.marker):
            return f"runs {type(module).__name__}, which reads the row in order: {missing.reason}"
    return f"runs {type(module).__name__}, which reads the row in order and no adapter drives"


def install_tree_recurrence(model: PreTrainedModel) -> None:
    """Give each recurrent mixer of ``model`` the tree forward, used in calls that carry
    ``RECURRENT_PLAN_KEY`` (the mask hook adds it); other calls run the original forward.
    Installing twice changes nothing."""
    mixers = recurrent_mixers(model)
    if not mixers:
        raise ValueError("no tree forward for the recurrent layers of this model: no mixer an adapter drives")
    for module in mixers:
        if getattr(module.forward, "onepass_tree_recurrence", False):
            continue
        _wrap(module, mixer_for(module).tree_forward)  # type: ignore[union-attr]


def _wrap(module: nn.Module, tree_forward: Callable[[Any, torch.Tensor, RecurrentPlan], torch.Tensor]) -> None:
    original = module.forward

    def forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan = kwargs.pop(RECURRENT_PLAN_KEY, None)
        if plan is None:
            return original(hidden_states, *args, **kwargs)
        if args or kwargs.get("attention_mask") is not None:
            raise ValueError("a tree row's recurrent layer takes its structure from the plan only")
        batch, length = hidden_states.shape[:2]
        if plan.shape != (batch, length):
            raise ValueError(f"recurrent plan is for [B, L] = {list(plan.shape)}, the call has {[batch, length]}")
        return tree_forward(self, hidden_states, plan)

    forward.onepass_tree_recurrence = True  # type: ignore[attr-defined]
    module.forward = MethodType(forward, module)  # type: ignore[method-assign]
