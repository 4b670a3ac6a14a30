"""One-pass and N-pass training runs through transformers.Trainer or TRL SFTTrainer, compared
step by step (losses, trained-token counts, final weights); and weighted one-pass runs
(onepass_trainer) against N-pass steps taken by hand with plain SGD."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from helpers.torch_models import n_pass_objective
from onepass_prep.torch import (
    MaskKind,
    OnePassCollator,
    OnePassDataset,
    install_mask_hook,
    onepass_trainer,
)

Samples = Sequence[tuple[Sequence[int], int]]
STEPS = 3


def n_pass_collate(items: Sequence[dict]) -> dict[str, torch.Tensor]:
    """The reference batch: every N-pass sample of the items, right-padded, plain causal."""
    samples = [s for item in items for s in zip(item["tokens"], item["starts"], strict=True)]
    length = max(len(tokens) for tokens, _ in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attention = torch.zeros_like(ids)
    for i, (tokens, start) in enumerate(samples):
        ids[i, : len(tokens)] = torch.tensor(tokens)
        labels[i, start : len(tokens)] = torch.tensor(tokens[start:])
        attention[i, : len(tokens)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


def recording(trainer_class: type[Trainer]) -> type[Trainer]:
    """The trainer class, also keeping (loss, trained tokens) of every step."""

    class Recording(trainer_class):
        steps: list[tuple[float, int]]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.steps.append((loss.item(), int(num_items_in_batch)))
            return loss

    return Recording


def common_args(out: Path, **overrides) -> dict:
    """SGD, because Adam divides by the gradient's own size: on an embedding row with a
    near-zero gradient it turns float32 rounding into visible weight differences."""
    return dict(
        output_dir=str(out), per_device_train_batch_size=1, max_steps=STEPS, learning_rate=0.1,
        optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, report_to="none", save_strategy="no",
        use_cpu=True, train_sampling_strategy="sequential", disable_tqdm=True, logging_steps=1,
        remove_unused_columns=False,
    ) | overrides


def train(kind: str, model: torch.nn.Module, dataset, collate, out: Path, tokenizer=None,
          onepass: bool = False, **overrides):
    """``kind`` "trainer" or "sft"; ``onepass``: through ``onepass_trainer``."""
    wrap = onepass_trainer if onepass else (lambda base: base)
    if kind == "trainer":
        trainer = recording(wrap(Trainer))(
            model=model, args=TrainingArguments(**common_args(out, **overrides)), train_dataset=dataset,
            data_collator=collate,
        )
    else:
        config = SFTConfig(  # bf16 (on by default) would compare at bf16 precision only
            **common_args(out, **overrides), dataset_kwargs={"skip_prepare_dataset": True},
            max_length=None, bf16=False,
        )
        trainer = recording(wrap(SFTTrainer))(
            model=model, args=config, train_dataset=dataset, data_collator=collate,
            processing_class=tokenizer,
        )
    trainer.steps = []
    trainer.train()
    return trainer.steps, {k: v.detach().clone() for k, v in model.state_dict().items()}


def compare_runs(kind: str, rows_source: Path, chats: Sequence[Samples], make_model, tmp_path,
                 collator: OnePassCollator, tokenizer=None, hook_kind: MaskKind | None = None) -> None:
    model = make_model()
    reference_model = make_model()
    reference_model.load_state_dict(model.state_dict())
    install_mask_hook(model, hook_kind)
    dataset = OnePassDataset(rows_source, cache_dir=tmp_path / "cache")
    reference = [{"tokens": [list(t) for t, _ in chat], "starts": [s for _, s in chat]} for chat in chats]
    if kind == "sft":  # SFTTrainer takes only datasets.Dataset; read the validated shards
        dataset = datasets.Dataset.from_parquet([str(f) for f in dataset.files])
        reference = datasets.Dataset.from_list(reference)
    steps, weights = train(kind, model, dataset, collator, tmp_path / "one", tokenizer)
    ref_steps, ref_weights = train(
        kind, reference_model, reference, n_pass_collate, tmp_path / "ref", tokenizer
    )
    assert len(steps) == STEPS
    assert [n for _, n in steps] == [n for _, n in ref_steps]
    np.testing.assert_allclose([loss for loss, _ in steps], [loss for loss, _ in ref_steps], rtol=1e-5)
    assert steps[0][0] != steps[-1][0]
    for name, value in ref_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


def sgd_reference(model: torch.nn.Module, steps: Sequence[tuple[list, list]], normalization: str,
                  lr: float) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Plain SGD steps on the N-pass objective, each over ``(chats, message weights)``."""
    losses = []
    for chats, weights in steps:
        loss = n_pass_objective(model, chats, weights, normalization)
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter -= lr * parameter.grad
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def compare_weighted(kind: str, folder: Path, steps: Sequence[tuple[list, list]], normalization: str,
                     make_model, tmp_path: Path, tokenizer=None, accumulation: int = 2,
                     batch: int = 1) -> None:
    """onepass_trainer(kind) over the rows of ``folder`` (``batch`` rows per micro-batch,
    ``accumulation`` micro-batches per step, in order; the last step takes what is left) == SGD on the N-pass objective of each
    step's conversations: the loss of every step and every weight after the last."""
    model = make_model()
    reference_model = make_model()
    reference_model.load_state_dict(model.state_dict())
    install_mask_hook(model)
    dataset = OnePassDataset(folder, cache_dir=tmp_path / "cache")
    if kind == "sft":
        dataset = datasets.Dataset.from_parquet([str(f) for f in dataset.files])
    micro, weights = train(
        kind, model, dataset, OnePassCollator(pad_to_multiple_of=16), tmp_path / "one", tokenizer,
        onepass=True, gradient_accumulation_steps=accumulation, per_device_train_batch_size=batch,
        max_steps=len(steps), max_grad_norm=0.0,
    )
    ref_losses, ref_weights = sgd_reference(reference_model, steps, normalization, lr=0.1)
    step_losses = [sum(loss for loss, _ in micro[i : i + accumulation]) for i in range(0, len(micro), accumulation)]
    assert len(step_losses) == len(steps)
    np.testing.assert_allclose(step_losses, ref_losses, rtol=1e-5)
    assert step_losses[0] != step_losses[-1]
    for name, value in ref_weights.items():  # float32 sums in another order: relative to the tensor
        scale = float(value.abs().max())
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-5 * scale, msg=name)
