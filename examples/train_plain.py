"""Train on onepass-prep shards with a plain PyTorch loop.

    .venv/bin/pip install -e '.[examples]'      # once, after the README's set-up
    onepass-prep convert sample_data/chats.jsonl --model qwen --max-seq-len 2048 -o out/sample
    python examples/train_plain.py out/sample
"""

from __future__ import annotations

import torch
from common import load_model, parse_args
from torch.utils.data import DataLoader

from onepass_prep.torch import OnePassCollator, OnePassDataset, check_vocab_size, install_mask_hook


def main() -> None:
    args = parse_args(__doc__)
    dataset = OnePassDataset(args.out_dir)  # validates every row once, then memory-maps
    model = load_model(args.model, args.attn)
    check_vocab_size(model, dataset)
    install_mask_hook(model)  # model(**batch) now builds the tree mask on the model's device
    loader = DataLoader(dataset, batch_size=1, shuffle=True, collate_fn=OnePassCollator())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step, batch in zip(range(args.steps), loader, strict=False):  # at most one epoch
        batch = {name: tensor.to(model.device) for name, tensor in batch.items()}
        loss = model(**batch).loss  # mean over the batch's trained tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trained = int((batch["labels"] != -100).sum())
        print(f"step {step}: loss {loss.item():.4f} over {trained} trained tokens")


if __name__ == "__main__":
    main()
