"""What an adapter tells the shared schedule about one kind of recurrent mixer."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .schedule import RecurrentPlan


@dataclass(frozen=True)
class Mixer:
    """``kind`` names the mixer in verdicts and docs; ``drives`` says from a module's
    structure whether ``tree_forward`` (the layer's forward with its convolution and scan run
    along the plan) knows how to call it."""

    kind: str
    drives: Callable[[nn.Module], bool]
    tree_forward: Callable[[Any, torch.Tensor, RecurrentPlan], torch.Tensor]


def modeling(module: nn.Module) -> ModuleType:
    """The module's modeling module: where transformers binds the kernels it selected."""
    return sys.modules[type(module).__module__]


def has(module: nn.Module, *names: str) -> bool:
    return all(hasattr(module, name) for name in names)


def kernels(module: nn.Module, *names: str) -> bool:
    namespace = vars(modeling(module))
    return all(callable(namespace.get(name)) for name in names)
