"""Train on onepass-prep shards with transformers.Trainer.

    .venv/bin/pip install -e '.[examples]'      # once, after the README's set-up
    onepass-prep convert sample_data/chats.jsonl --model qwen -o out/sample   # the README's demo
    python examples/train_trainer.py out/sample
"""

from __future__ import annotations

import tempfile

from common import load_model, mask_kind, parse_args
from transformers import Trainer, TrainingArguments

from onepass_prep.torch import (
    OnePassCollator,
    OnePassDataset,
    check_vocab_size,
    install_mask_hook,
    onepass_trainer,
)


def main() -> None:
    args = parse_args(__doc__)
    dataset = OnePassDataset(args.out_dir)
    model = load_model(args.model, args.attn)
    check_vocab_size(model, dataset)
    install_mask_hook(model, kind=mask_kind(args.attn))
    training = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=args.steps,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=args.accumulation,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        # Trainer would otherwise drop `mask_spec` (not a forward argument) before collation.
        remove_unused_columns=False,
    )
    # onepass_trainer: the loss the rows' loss_weights and loss_units encode, whatever the
    # normalization; a plain Trainer refuses data that is not the plain token mean.
    onepass_trainer(Trainer)(
        model=model, args=training, train_dataset=dataset, data_collator=OnePassCollator()
    ).train()


if __name__ == "__main__":
    main()
