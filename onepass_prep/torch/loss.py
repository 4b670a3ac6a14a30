"""The one loss of every training loop: per-token weights over the optimizer step's units.

Every row encodes, whatever normalization the converter chose (docs/FORMAT.md), the objective

    loss_step = sum over the step's rows r and tokens t of loss_weights[r, t] * CE(logits[r, t-1], labels[r, t])
                / sum over the step's rows r of loss_units[r]

where the step is every gradient-accumulation micro-batch on every data-parallel rank. So a
loop needs two things: ``onepass_loss`` per micro-batch, and the step's denominator, summed
before the first backward (``step_denominator`` in a plain loop, ``onepass_trainer``'s
``get_batch_samples`` under transformers.Trainer / TRL SFTTrainer).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .head import full_logits_sum, head_loss

WEIGHTS_KEY = "loss_weights"
UNITS_KEY = "loss_units"
LOSS_KEYS = (WEIGHTS_KEY, UNITS_KEY)


def onepass_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_weights: torch.Tensor,
    denominator: torch.Tensor | float,
) -> torch.Tensor:
    """``sum_t loss_weights[:, t] * CE(logits[:, t-1], labels[:, t]) / denominator`` (float32 or wider).

    ``logits`` ``[B, L, V]``, ``labels`` and ``loss_weights`` ``[B, L]`` as the collator gives
    them (the causal shift is done here: token ``t`` is predicted at position ``t - 1``).
    ``denominator`` is the optimizer step's summed ``loss_units`` (all micro-batches, all
    ranks); a step without any unit divides by 1 (its sum is 0). Only trained positions reach
    the cross-entropy, so no ``[B, L, V]`` float32 copy of the logits is made. For logits a
    model has not computed yet, ``forward_loss`` is cheaper: it computes only these.
    """
    if logits.shape[:2] != labels.shape or labels.shape != loss_weights.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and loss_weights "
            f"{tuple(loss_weights.shape)} do not line up as [B, L, V], [B, L], [B, L]"
        )
    return _over(full_logits_sum(logits, labels, loss_weights), denominator)


def _over(total: torch.Tensor, denominator: torch.Tensor | float) -> torch.Tensor:
    denominator = torch.as_tensor(denominator, device=total.device).to(total.dtype)
    return total / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def forward_loss(
    model: Any,
    batch: Mapping[str, Any],
    denominator: torch.Tensor | float,
    *,
    full_logits: bool = False,
    **model_kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """``onepass_loss`` of ``model`` on a collated batch, with logits only where a token is
    trained: ``(loss, outputs)``.

    The model gets the batch without its labels and loss columns (it computes no loss of its
    own and never sees the weights). Where its head is recognised (head.py, ``output_head``:
    Llama, Qwen, Mistral, Gemma and other transformers families) the head and the
    cross-entropy run in chunks over the positions that predict a trained token, and
    ``outputs.logits`` is empty (``[B, 0, V]``); for any other model ``logits_to_keep`` holds
    those positions (the union over the batch's rows) and ``outputs.logits`` is ``[B, K, V]``
    at them. ``full_logits=True`` computes ``[B, L, V]`` as a plain call does (debugging).
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", *LOSS_KEYS)}
    if "labels" not in batch or WEIGHTS_KEY not in batch:
        raise KeyError(f"the batch needs 'labels' and '{WEIGHTS_KEY}' (OnePassCollator output)")
    labels, weights = batch["labels"], batch[WEIGHTS_KEY]
    if labels.shape != weights.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and loss_weights {tuple(weights.shape)} differ")
    total, outputs = head_loss(model, inputs, labels, weights, full_logits, model_kwargs)
    return _over(total, denominator), outputs


def step_denominator(
    batches: Iterable[Mapping[str, Any]], device: torch.device | str | None = None
) -> torch.Tensor:
    """The optimizer step's denominator: ``loss_units`` summed over its micro-batches, and over
    data-parallel ranks (``all_reduce``) when torch.distributed is initialised.

    Call it on all of a step's micro-batches before the first backward. Under DDP, which
    averages gradients over ranks, multiply each micro-batch's loss by the world size (as
    transformers does with ``average_tokens_across_devices``). ``device`` is where the
    all-reduce runs (default: the current CUDA device under NCCL, else the CPU).
    """
    total = torch.zeros((), dtype=torch.int64)
    for batch in batches:
        if UNITS_KEY not in batch:
            raise KeyError(f"a batch has no '{UNITS_KEY}' (OnePassCollator output)")
        total += torch.as_tensor(batch[UNITS_KEY]).sum().cpu()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if device is None:
            nccl = torch.distributed.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        total = total.to(device)
        torch.distributed.all_reduce(total)
    elif device is not None:
        total = total.to(device)
    return total


def plain_token_mean(loss_weights: torch.Tensor, loss_units: torch.Tensor | None) -> bool:
    """Whether the weights say nothing the model's own loss does not: every trained token has
    weight 1 and every row's units are its trained tokens (Trainer's ``num_items_in_batch``)."""
    trained = loss_weights != 0
    if not bool(((loss_weights == 1) | ~trained).all()):
        return False
    if loss_units is None:
        return True
    counts = trained.flatten(1).sum(-1) if trained.dim() > 1 else trained.sum()
    return bool((counts == loss_units.to(counts.device).reshape(counts.shape)).all())
