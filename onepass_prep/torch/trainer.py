"""``transformers.Trainer`` and TRL ``SFTTrainer`` with the one-pass loss (loss.py).

Trainer's own hooks for a custom loss do not carry what the loss needs: ``compute_loss_func
(outputs, labels, num_items_in_batch)`` never sees the batch's ``loss_weights``, and
``num_items_in_batch`` counts labels, not ``loss_units``. So the class ``onepass_trainer``
returns overrides the two public methods that own these: ``get_batch_samples`` (the step's
micro-batches and their denominator) and ``compute_loss``. transformers is not imported here:
the caller passes the class.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

from .loss import UNITS_KEY, WEIGHTS_KEY, forward_loss

T = TypeVar("T", bound=type)


def onepass_trainer(base: T, *, full_logits: bool = False) -> T:
    """A subclass of ``base`` (``transformers.Trainer``, TRL ``SFTTrainer``, or a subclass of
    either) that trains the objective the rows' ``loss_weights`` and ``loss_units`` encode.

    - ``get_batch_samples`` returns, as ``num_items_in_batch``, the step's ``loss_units``
      summed over its gradient-accumulation micro-batches and gathered over processes
      (always, whatever ``average_tokens_across_devices`` says: anything else is not the
      objective).
    - ``compute_loss`` computes ``forward_loss(model, inputs, denominator, use_cache=False)``
      (the mask hook builds the attention; logits only where a token is trained, the head in
      chunks where it is recognised) over that denominator, times the number of processes
      because DDP averages gradients. The loss is already scaled for gradient accumulation.
      ``full_logits=True`` computes every position's logits instead (debugging).
    - Evaluation (model in eval mode) divides each batch by its own units.

    SFTTrainer's fused LM head, and its entropy and token-accuracy metrics, are not used: its
    loss ignores the weights.
    """
    if not hasattr(base, "loss_is_scaled_for_ga"):
        raise TypeError(
            f"{base.__name__} has no 'loss_is_scaled_for_ga' (transformers >= 5.23 has it); "
            "without it Trainer would divide the loss by the accumulation steps once more"
        )

    class OnePass(base):  # type: ignore[valid-type,misc]
        loss_is_scaled_for_ga = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.args.n_gpu > 1:
                raise ValueError(
                    "one-pass training needs one process per device (torchrun / accelerate "
                    "launch), not torch.nn.DataParallel over several GPUs"
                )

        def get_batch_samples(
            self, epoch_iterator: Any, num_batches: int, device: torch.device
        ) -> tuple[list, torch.Tensor | None]:
            batches = []
            for _ in range(num_batches):
                try:
                    batches.append(next(epoch_iterator))
                except StopIteration:
                    break
            if not batches:
                return batches, None
            if any(UNITS_KEY not in batch for batch in batches):
                raise KeyError(f"a batch has no '{UNITS_KEY}': use OnePassCollator")
            units = sum(torch.as_tensor(batch[UNITS_KEY]).sum() for batch in batches)
            units = torch.as_tensor(units).to(device)
            if self.args.world_size > 1:
                units = self.accelerator.gather(units).sum()
            # Ranks that share a batch (tensor, context, sequence parallel) count it once, as
            # in Trainer._get_num_items_in_batch.
            return batches, units / self._replicas()

        def _replicas(self) -> int:
            sizes = (getattr(self, f"get_{p}_size", lambda: 1)() for p in ("tp", "cp", "sp"))
            product = 1
            for size in sizes:
                product *= size
            return product

        def compute_loss(
            self,
            model: torch.nn.Module,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: torch.Tensor | int | None = None,
        ) -> Any:
            if WEIGHTS_KEY not in inputs or UNITS_KEY not in inputs:
                raise KeyError(f"the batch has no '{WEIGHTS_KEY}'/'{UNITS_KEY}': use OnePassCollator")
            # Trainer passes the step's units while training; in evaluation it passes a count
            # of labels, so a batch is divided by its own units there.
            step = model.training and num_items_in_batch is not None
            denominator = num_items_in_batch if step else inputs[UNITS_KEY].sum()
            assert denominator is not None
            loss, outputs = forward_loss(
                model, inputs, denominator, full_logits=full_logits, use_cache=False
            )
            if step:  # DDP averages the ranks' gradients; the denominator is already global
                tp = getattr(self, "get_tp_size", lambda: 1)()
                loss = loss * (self.accelerator.num_processes // tp)
            return (loss, outputs) if return_outputs else loss

    OnePass.__name__ = OnePass.__qualname__ = f"OnePass{base.__name__}"
    return OnePass  # type: ignore[return-value]
