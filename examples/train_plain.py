"""Train on onepass-prep shards with a plain PyTorch loop.

    .venv/bin/pip install -e '.[examples]'      # once, after the README's set-up
    onepass-prep convert sample_data/chats.jsonl --model qwen -o out/sample   # the README's demo
    python examples/train_plain.py out/sample

Any loss normalization (`convert --loss-normalization token|turn|conversation`) and message
weights train exactly: each micro-batch's weighted loss is divided by the whole step's
`loss_units` (docs/training.md, "The loss").
"""

from __future__ import annotations

import itertools

import torch
from common import load_model, mask_kind, parse_args
from torch.utils.data import DataLoader

from onepass_prep.torch import (
    OnePassCollator,
    OnePassDataset,
    check_vocab_size,
    forward_loss,
    install_mask_hook,
    step_denominator,
)


def main() -> None:
    args = parse_args(__doc__)
    dataset = OnePassDataset(args.out_dir)  # validates every row once, then memory-maps
    model = load_model(args.model, args.attn)
    check_vocab_size(model, dataset)
    # model(**batch) now builds the tree's mask (or tree attention's plan) on the model's device
    install_mask_hook(model, kind=mask_kind(args.attn))
    loader = DataLoader(dataset, batch_size=1, shuffle=True, collate_fn=OnePassCollator())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # Under DDP, which averages gradients over ranks, scale each loss by the world size:
    # step_denominator already sums the units of every rank.
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if distributed else 1
    model.train()
    # A step takes --accumulation micro-batches of one epoch (an epoch's last step takes
    # what is left); the steps asked for run over as many epochs as they need.
    if not len(loader):
        raise SystemExit(f"{args.out_dir}: no rows to train on")
    per_epoch = -(-len(loader) // args.accumulation)
    epochs = -(-args.steps // per_epoch)
    last = len(loader) - (per_epoch - 1) * args.accumulation
    print(
        f"{plural(len(loader), 'row')} per epoch, {args.accumulation} per step (--accumulation): "
        f"{plural(per_epoch, 'step')} per epoch, the last of {plural(last, 'row')}; "
        f"{plural(args.steps, 'step')} over {plural(epochs, 'epoch')}"
    )
    step = 0
    for epoch in range(epochs):
        batches = iter(loader)  # reshuffled each epoch
        while step < args.steps and (micro := list(itertools.islice(batches, args.accumulation))):
            denominator = step_denominator(micro)  # the step's loss_units (all ranks under DDP)
            step_loss = 0.0
            for batch in micro:
                batch = {name: tensor.to(model.device) for name, tensor in batch.items()}
                # logits only where a token is trained, the head in chunks; no weights reach the model
                loss, _ = forward_loss(model, batch, denominator)
                (loss * world).backward()
                step_loss += loss.item()
            optimizer.step()
            optimizer.zero_grad()
            print(
                f"epoch {epoch} step {step}: loss {step_loss:.4f} over {int(denominator)} loss units "
                f"of {plural(len(micro), 'row')}"
            )
            step += 1


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


if __name__ == "__main__":
    main()
