"""Train on onepass-prep shards with TRL's SFTTrainer.

    .venv/bin/pip install -e '.[examples]'      # once, after the README's set-up
    onepass-prep convert sample_data/chats.jsonl --model qwen -o out/sample   # the README's demo
    python examples/train_sft.py out/sample
"""

from __future__ import annotations

import tempfile

import datasets
import torch
from common import load_model, mask_kind, parse_args
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from onepass_prep.convert.tokenizer import qwen_tokenizer_dir
from onepass_prep.torch import (
    OnePassCollator,
    OnePassDataset,
    check_vocab_size,
    install_mask_hook,
    onepass_trainer,
)


def main() -> None:
    args = parse_args(__doc__)
    # SFTTrainer takes only a `datasets` dataset: validate with the onepass reader, then let
    # `datasets` read the same (already checked) shards.
    checked = OnePassDataset(args.out_dir)
    dataset = datasets.Dataset.from_parquet([str(path) for path in checked.files])
    model = load_model(args.model, args.attn)
    tokenizer = AutoTokenizer.from_pretrained(args.model or qwen_tokenizer_dir())
    check_vocab_size(model, checked)
    install_mask_hook(model, kind=mask_kind(args.attn))
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=args.steps,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=args.accumulation,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # keep mask_spec and position_ids for the collator
        dataset_kwargs={"skip_prepare_dataset": True},  # rows are already tokenized and labelled
        max_length=None,  # rows are laid out whole; truncating would cut branches
        use_cpu=not torch.cuda.is_available(),  # SFTConfig turns bf16 on, which wants this on CPU
    )
    # onepass_trainer: the loss the rows' loss_weights and loss_units encode (from the logits;
    # SFTTrainer's own fused-head loss would ignore the weights, and is refused on weighted data).
    onepass_trainer(SFTTrainer)(
        model=model, args=config, train_dataset=dataset, data_collator=OnePassCollator(),
        processing_class=tokenizer,
    ).train()


if __name__ == "__main__":
    main()
