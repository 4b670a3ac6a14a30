"""The LM head where a token is trained, and its cross-entropy in chunks.

A one-pass row is long and most of its positions train nothing (context, answer copies, tool
output, padding), yet a model called plainly projects every position onto the vocabulary:
``[B, L, V]`` logits and as large a gradient, 10 GB of bf16 each for a 32k-token row and a
Qwen3 vocabulary. The positions that matter are known before the forward (``labels[t] !=
-100`` is predicted at ``t - 1``), so:

- **chunked** (a head this module recognises, ``output_head``): the model runs its body once
  with ``logits_to_keep`` empty (its own head sees no position), the last hidden state is
  taken from the body's output, and ``ChunkedHeadLoss`` projects the trained positions a
  chunk at a time, computing each chunk's weighted cross-entropy and its gradient before the
  next: no ``[T, V]`` logits or gradient ever exist at once.
- **kept** (any other model): ``logits_to_keep`` = the positions that predict a trained
  token in any row of the batch; the model's own head runs on those only.

Under FSDP2 (``fully_shard``) the head's weight is a sharded ``DTensor`` outside a forward.
The chunked path reads it inside the model's call: where the head belongs to the model's own
FSDP unit (the usual root, tied or not), that forward has gathered it (once per step, in the
parameters' compute dtype under a ``MixedPrecisionPolicy``); where the head is an FSDP unit
of its own, the chunks run in a method of the head registered with
``register_fsdp_forward_method``, so FSDP's hooks gather it, and its gradient goes to FSDP's
reduce-scatter either way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from onepass_prep.format import IGNORE_INDEX

# Positions per chunk: as many as keep one chunk's logits under this many elements (a float32
# chunk of 128 MiB; 220 positions of a Qwen3 vocabulary).
CHUNK_ELEMENTS = 2**25

Transform = Callable[[torch.Tensor], torch.Tensor]


def _softcap(model: Any) -> Transform | None:
    cap = model.config.final_logit_softcapping
    if cap is None:
        return None
    return lambda logits: torch.tanh(logits / cap) * cap


def _granite(model: Any) -> Transform:
    scaling = model.config.logits_scaling
    return lambda logits: logits / scaling


def _cohere(model: Any) -> Transform:
    scale = model.logit_scale
    return lambda logits: logits * scale


def _identity(_model: Any) -> None:
    return None


# ForCausalLM forwards read in transformers 5 (models/*/modeling_*.py): each calls
# ``self.model(...)``, slices ``last_hidden_state`` by ``logits_to_keep``, applies
# ``self.lm_head`` and then exactly this (nothing for the plain ones).
_KNOWN: dict[str, Callable[[Any], Transform | None]] = {
    **{
        f"{family}.{name}": _identity
        for family, name in [
            ("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
            ("mixtral", "MixtralForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
            ("qwen2_moe", "Qwen2MoeForCausalLM"), ("qwen3", "Qwen3ForCausalLM"),
            ("qwen3_moe", "Qwen3MoeForCausalLM"), ("gemma", "GemmaForCausalLM"),
            ("olmo2", "Olmo2ForCausalLM"), ("phi3", "Phi3ForCausalLM"),
            ("smollm3", "SmolLM3ForCausalLM"), ("glm4", "Glm4ForCausalLM"),
            ("olmo3", "Olmo3ForCausalLM"), ("qwen3_5", "Qwen3_5ForCausalLM"),
            ("qwen3_next", "Qwen3NextForCausalLM"),
        ]
    },
    "gemma2.Gemma2ForCausalLM": _softcap,
    "gemma3.Gemma3ForCausalLM": _softcap,
    "granite.GraniteForCausalLM": _granite,
    "cohere.CohereForCausalLM": _cohere,
}


@dataclass(frozen=True)
class OutputHead:
    """A recognised head: ``transform(F.linear(hidden, linear.weight, linear.bias))`` is the
    model's logits. ``weight``/``bias`` are read when asked: under FSDP2 they are whole only
    inside the model's (or the head's) forward."""

    body: nn.Module
    linear: nn.Linear
    transform: Transform | None

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias


def _unwrap(model: nn.Module) -> Any:
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def _forward_key(model: nn.Module) -> str | None:
    """``family.ClassName`` of the transformers forward the model's class runs (inherited by
    a subclass that does not override it, such as FSDP2's ``FSDPQwen3ForCausalLM``)."""
    forward = type(model).forward
    package, _, family = forward.__module__.rpartition(".modeling_")
    if not package.startswith("transformers.models."):
        return None
    return f"{family}.{forward.__qualname__.removesuffix('.forward')}"


# Wrappers of a model's forward that call it unchanged in a context: TRL's fused-head patch
# (SFTTrainer adds it; without ``fused_lm_head=True`` it calls the forward as is,
# trl/trainer/utils.py ``add_fused_lm_head``), autocast as a decorator, and accelerate's
# mixed-precision wrapper (autocast, then outputs to float32, ``Accelerator.prepare_model``).
_PASS_THROUGH = ("trl.", "torch.amp.", "accelerate.")


def _instance_forward_passes_through(model: nn.Module) -> bool:
    """No forward set on the instance, or one whose ``__wrapped__`` chain leads to the class's
    forward through ``_PASS_THROUGH`` wrappers only."""
    link = vars(model).get("forward")
    while link is not None and link is not type(model).forward:
        link = getattr(link, "__func__", link)
        globals_ = getattr(link, "__globals__", None)
        defined_in = globals_["__name__"] if globals_ else type(link).__module__  # wraps copies __module__
        if not defined_in.startswith(_PASS_THROUGH):
            return False
        link = getattr(link, "__wrapped__", None)
        if link is None:
            return False
    return True


def output_head(model: nn.Module) -> OutputHead | None:
    """The model's head if it is one ``ChunkedHeadLoss`` computes exactly, else None.

    Recognised: a model (or the module of a DDP wrapper) that runs the forward of one of the
    ForCausalLM classes of ``_KNOWN`` (a subclass that overrides ``forward`` is not), called
    as is or through pass-through wrappers only, whose ``get_output_embeddings()`` is a plain
    ``nn.Linear`` (tied or not) with whole, ordinary weights, or weights that FSDP2 shards
    (the model or the head is an ``FSDPModule``); not DeepSpeed ZeRO-3 placeholders, nor
    tensor-parallel DTensors.
    """
    inner = _unwrap(model)
    key = _forward_key(inner)
    if key is None or key not in _KNOWN or not _instance_forward_passes_through(inner):
        return None
    head = inner.get_output_embeddings()
    body = getattr(inner, "model", None)
    if _unsharded_class(head) is not nn.Linear or not isinstance(body, nn.Module):
        return None
    weight = head.weight
    if type(weight.data) is not torch.Tensor and not _fsdp_gathers(inner, head):
        return None
    if weight.dim() != 2 or weight.numel() == 0:
        return None
    return OutputHead(body, head, _KNOWN[key](inner))


def _unsharded_class(module: nn.Module) -> type:
    """The module's class, or the one FSDP2's ``FSDP<Class>(FSDPModule, Class)`` extends."""
    kind = type(module)
    if kind.__name__.startswith("FSDP") and len(kind.__bases__) == 2:
        return kind.__bases__[1]
    return kind


def _fsdp_gathers(model: nn.Module, head: nn.Module) -> bool:
    """Whether FSDP2 gathers the head's weight: the model or the head is an ``FSDPModule``."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or isinstance(head, FSDPModule)


_HEAD_CALL = "_onepass_head_call"


def _call_with_head(head: nn.Module, compute: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                    hidden: torch.Tensor) -> torch.Tensor:
    """``compute(head, hidden)``; under FSDP's forward hooks where the head is an FSDP unit
    (its weight gathered, cast to the compute dtype, its gradient reduce-scattered)."""
    if not torch.distributed.is_available():
        return compute(head, hidden)
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if not isinstance(head, FSDPModule):
        return compute(head, hidden)
    if _HEAD_CALL not in vars(head):
        # ``compute`` is no tensor, so FSDP's input cast leaves it (and what it holds) alone
        object.__setattr__(head, _HEAD_CALL, MethodType(lambda module, h, fn: fn(module, h), head))
        register_fsdp_forward_method(head, _HEAD_CALL)
    return getattr(head, _HEAD_CALL)(hidden, compute)


def predicting_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, positions)`` of every position ``t - 1`` whose next token ``t`` is trained,
    in row-major order."""
    rows, positions = torch.nonzero(labels[:, 1:] != IGNORE_INDEX, as_tuple=True)
    return rows, positions


def weighted_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``sum_i weights[i] * CE(logits[i], targets[i])``, in float32 or wider."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    token_loss = F.cross_entropy(logits.to(dtype), targets, reduction="none")
    return (token_loss * weights.to(dtype)).sum()


class ChunkedHeadLoss(torch.autograd.Function):
    """``sum_i w_i * CE(transform(hidden[i] @ weight.T + bias), targets[i])`` a chunk of
    positions at a time.

    The forward computes each chunk's loss and, when a gradient is needed, its gradient with
    respect to the chunk's logits (autograd over the transform and the cross-entropy), turned
    at once into the chunk's rows of ``d hidden`` and its share of ``d weight`` / ``d bias``.
    The backward only scales these by the incoming gradient. Every tensor of the vocabulary's
    width is one chunk's.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        weights: torch.Tensor,
        transform: Transform | None,
    ) -> torch.Tensor:
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_any = need_hidden or need_weight or need_bias
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
        dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # d weight summed over chunks in float32 or wider, cast to the weight's dtype at the end
        grad_weight = torch.zeros_like(weight, dtype=dtype) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=dtype) if need_bias and bias is not None else None
        for start in range(0, hidden.shape[0], chunk):
            rows = hidden[start : start + chunk]
            raw = F.linear(rows, weight, bias)  # what the model's nn.Linear head computes
            with torch.enable_grad() if need_any else nullcontext():
                raw.requires_grad_(need_any)
                logits = raw if transform is None else transform(raw)
                loss = weighted_cross_entropy(
                    logits, targets[start : start + chunk], weights[start : start + chunk]
                )
            total += loss.detach()
            if not need_any:
                continue
            (grad_raw,) = torch.autograd.grad(loss, raw)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = grad_raw @ weight
            if grad_weight is not None:
                grad_weight += (grad_raw.T @ rows).to(dtype)
            if grad_bias is not None:
                grad_bias += grad_raw.sum(0).to(dtype)
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        weight_dtype, bias_dtype = ctx.dtypes
        scaled = (
            None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * grad_total).to(weight_dtype),
            None if grad_bias is None else (grad_bias * grad_total).to(bias_dtype),
        )
        return (*scaled, None, None, None)


def _chunked(
    model: Any, head: OutputHead, inputs: Mapping[str, Any], labels: torch.Tensor,
    loss_weights: torch.Tensor, model_kwargs: Mapping[str, Any],
) -> tuple[torch.Tensor, Any]:
    totals: list[torch.Tensor] = []

    def loss_of_body(_module: nn.Module, _args: Any, output: Any) -> None:
        # Inside the model's call, so under whatever context its forward sets (autocast) as
        # its own head would be.
        hidden = output.last_hidden_state
        rows, positions = predicting_positions(labels.to(hidden.device))
        device = head.weight.device
        picked = hidden[rows, positions].to(device)
        targets = labels.to(device)[rows.to(device), positions.to(device) + 1]
        weights = loss_weights.to(device)[rows.to(device), positions.to(device) + 1]

        def compute(linear: nn.Module, rows_hidden: torch.Tensor) -> torch.Tensor:
            # the head's weight as it is now: gathered where FSDP2 shards it
            weight = linear.weight
            if type(weight.data) is not torch.Tensor:
                raise RuntimeError(
                    f"the head's weight is a {type(weight.data).__name__} inside the model's "
                    "forward: shard it with the model's own FSDP unit or as one of its own"
                )
            return ChunkedHeadLoss.apply(rows_hidden, weight, linear.bias, targets, weights, head.transform)

        totals.append(_call_with_head(head.linear, compute, picked))

    # The call goes through the model itself, so its pre-hooks (the mask hook), DDP and any
    # wrapper see it as usual; its own head gets no position.
    handle = head.body.register_forward_hook(loss_of_body)
    try:
        none = torch.zeros(0, dtype=torch.long, device=labels.device)
        outputs = model(**inputs, **model_kwargs, logits_to_keep=none)
    finally:
        handle.remove()
    if len(totals) != 1:
        raise RuntimeError(f"the model ran its body {len(totals)} times in one call; expected once")
    return totals[0], outputs


def _kept(
    model: Any, inputs: Mapping[str, Any], labels: torch.Tensor, loss_weights: torch.Tensor,
    model_kwargs: Mapping[str, Any],
) -> tuple[torch.Tensor, Any]:
    length = labels.shape[1]
    keep = torch.unique(predicting_positions(labels)[1])  # sorted; the union over rows
    outputs = model(**inputs, **model_kwargs, logits_to_keep=keep)
    logits = outputs.logits
    if logits.shape[:2] == labels.shape:  # keep holds at most L - 1 positions
        # the model ignored logits_to_keep: its full logits are right, only larger
        return full_logits_sum(logits, labels, loss_weights), outputs
    if logits.shape[:2] != (labels.shape[0], len(keep)):
        raise ValueError(
            f"the model returned logits {tuple(logits.shape)} for logits_to_keep of {len(keep)} "
            f"positions in rows of {length}"
        )
    following = (keep + 1).to(logits.device)
    targets = labels.to(logits.device)[:, following]
    trained = targets != IGNORE_INDEX
    weights = loss_weights.to(logits.device)[:, following][trained]
    return weighted_cross_entropy(logits[trained], targets[trained], weights), outputs


def full_logits_sum(logits: torch.Tensor, labels: torch.Tensor, loss_weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum over ``[B, L, V]`` logits of every position (the causal shift here)."""
    targets = labels[:, 1:].to(logits.device)
    trained = targets != IGNORE_INDEX
    weights = loss_weights[:, 1:].to(logits.device)[trained]
    return weighted_cross_entropy(logits[:, :-1][trained], targets[trained], weights)


def head_loss(
    model: Any, inputs: Mapping[str, Any], labels: torch.Tensor, loss_weights: torch.Tensor,
    full_logits: bool, model_kwargs: Mapping[str, Any],
) -> tuple[torch.Tensor, Any]:
    """``sum_t loss_weights[:, t] * CE(logits[:, t-1], labels[:, t])`` of ``model(**inputs)``,
    chunked where the head is recognised, else over the kept positions; ``full_logits``: the
    model's logits of every position, as a plain call returns them."""
    if "logits_to_keep" in model_kwargs:
        raise ValueError("forward_loss chooses logits_to_keep itself; do not pass it")
    if full_logits:
        outputs = model(**inputs, **model_kwargs)
        return full_logits_sum(outputs.logits, labels, loss_weights), outputs
    head = output_head(model)
    if head is None:
        return _kept(model, inputs, labels, loss_weights, model_kwargs)
    return _chunked(model, head, inputs, labels, loss_weights, model_kwargs)
