"""One-pass and N-pass training runs through transformers.Trainer or TRL SFTTrainer, compared
step by step (losses, trained-token counts, final weights)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from onepass_prep.torch import MaskKind, OnePassCollator, OnePassDataset, install_mask_hook

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


def common_args(out: Path) -> dict:
    """SGD, because Adam divides by the gradient's own size: on an embedding row with a
    near-zero gradient it turns float32 rounding into visible weight differences."""
    return dict(
        output_dir=str(out), per_device_train_batch_size=1, max_steps=STEPS, learning_rate=0.1,
        optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, report_to="none", save_strategy="no",
        use_cpu=True, train_sampling_strategy="sequential", disable_tqdm=True, logging_steps=1,
        remove_unused_columns=False,
    )


def train(kind: str, model: torch.nn.Module, dataset, collate, out: Path, tokenizer=None):
    if kind == "trainer":
        trainer = recording(Trainer)(
            model=model, args=TrainingArguments(**common_args(out)), train_dataset=dataset,
            data_collator=collate,
        )
    else:
        config = SFTConfig(  # bf16 (on by default) would compare at bf16 precision only
            **common_args(out), dataset_kwargs={"skip_prepare_dataset": True}, max_length=None,
            bf16=False,
        )
        trainer = recording(SFTTrainer)(
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
