"""Train on onepass-prep shards with FSDP2 (``fully_shard``): a plain loop, ``Accelerator``,
``transformers.Trainer`` or TRL ``SFTTrainer``, one process per device.

    .venv/bin/pip install -e '.[examples]'      # once, after the README's set-up
    onepass-prep convert sample_data/chats.jsonl --model qwen -o out/sample   # the README's demo
    torchrun --nproc-per-node 2 examples/train_sharded.py out/sample --launcher plain
    # --launcher accelerate | trainer | sft; on a CPU torchrun starts gloo ranks

Each launcher prints one line per optimizer step on rank 0: ``step N loss X`` (the step's
objective, whatever the number of ranks). ``accelerate launch`` works as well where there
are devices; ``accelerate launch --cpu`` starts a single process, so on a CPU use torchrun.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from common import load_model
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.utils.data import DataLoader

from onepass_prep.torch import (
    OnePassCollator,
    OnePassDataset,
    OnePassIterableDataset,
    forward_loss,
    install_mask_hook,
    onepass_trainer,
    step_denominator,
)

LEARNING_RATE = 0.1  # plain SGD: every launcher takes the same steps


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="output folder of `onepass-prep convert`")
    parser.add_argument("--launcher", choices=["plain", "accelerate", "trainer", "sft"], default="plain")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per step and rank")
    parser.add_argument("--model", help="a causal LM to load with from_pretrained (default: tiny random Qwen3)")
    return parser.parse_args()


def layer_class(model: torch.nn.Module) -> type:
    return type(model.model.layers[0])


def shard(model: torch.nn.Module) -> FSDPModule:
    """One FSDP unit per decoder layer, and the root (embeddings, final norm, head) last."""
    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def wrapping(model: torch.nn.Module) -> str:
    """How the model is distributed: accelerate 1.16 turns an FSDP plugin into DDP on a CPU."""
    return "FSDP2" if isinstance(model, FSDPModule) else f"{type(model).__name__} (not FSDP)"


def gradient_sync(model: torch.nn.Module, last: bool) -> AbstractContextManager:
    """Reduce gradients over ranks on the step's last micro-batch only: FSDP2's switch, or DDP's
    ``no_sync`` (what accelerate wraps the model in on a CPU, where it never uses FSDP)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last)
        return nullcontext()
    return nullcontext() if last else model.no_sync()


def micro_batches(dataset: OnePassIterableDataset, accumulation: int) -> Iterator[list[dict]]:
    """A step's micro-batches, epoch after epoch. Every rank gets the same number of rows per
    epoch (padding rows that train nothing), so every rank takes the same steps."""
    for epoch in itertools.count():
        dataset.set_epoch(epoch)
        batches = iter(DataLoader(dataset, batch_size=1, collate_fn=OnePassCollator()))
        while step := list(itertools.islice(batches, accumulation)):
            yield step


def sharded_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dataset: OnePassIterableDataset,
                  args: argparse.Namespace) -> None:
    """The plain loop of docs/training.md under FSDP2: the denominator summed over the step's
    micro-batches and ranks before the first backward, the loss times the world size (FSDP
    averages the ranks' gradients), gradients reduced on the step's last micro-batch."""
    world = dist.get_world_size()
    if dist.get_rank() == 0:
        print(f"training under {wrapping(model)} on {world} ranks", flush=True)
    for number, step in enumerate(itertools.islice(micro_batches(dataset, args.accumulation), args.steps)):
        denominator = step_denominator(step)
        total = torch.zeros(())
        for i, batch in enumerate(step):
            with gradient_sync(model, last=i == len(step) - 1):
                loss, _ = forward_loss(model, batch, denominator, use_cache=False)
                (loss * world).backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad()
        dist.all_reduce(total)
        if dist.get_rank() == 0:
            print(f"step {number + 1} loss {total.item():.7f}", flush=True)


def plain(args: argparse.Namespace) -> None:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    model = load_model(args.model, "sdpa")
    install_mask_hook(model)  # before sharding: the hook is on the model's own forward
    model = shard(model.to("cuda" if torch.cuda.is_available() else "cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    dataset = OnePassIterableDataset(args.out_dir, shuffle=False)  # rank and world from dist
    sharded_steps(model, optimizer, dataset, args)
    dist.destroy_process_group()


def accelerate(args: argparse.Namespace) -> None:
    from accelerate import Accelerator, FullyShardedDataParallelPlugin

    model = load_model(args.model, "sdpa")
    install_mask_hook(model)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[layer_class(model).__name__], reshard_after_forward=True,
    )
    accelerator = Accelerator(fsdp_plugin=plugin, cpu=not torch.cuda.is_available())
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    model, optimizer = accelerator.prepare(model, optimizer)
    # not accelerator.prepare(loader): its even_batches repeats rows to even the ranks, which
    # would train them twice; the streaming dataset evens them with rows that train nothing
    dataset = OnePassIterableDataset(args.out_dir, shuffle=False)
    sharded_steps(model, optimizer, dataset, args)
    accelerator.end_training()


def trainer(args: argparse.Namespace, sft: bool) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class PrintLoss(TrainerCallback):
        def on_train_begin(self, _args, state, _control, model=None, **_kwargs):
            if state.is_world_process_zero:
                print(f"training under {wrapping(model)}", flush=True)

        def on_log(self, _args, state, _control, logs=None, **_kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                print(f"step {state.global_step} loss {logs['loss']:.7f}", flush=True)

    model = load_model(args.model, "sdpa")
    install_mask_hook(model)
    options = dict(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=1,
        gradient_accumulation_steps=args.accumulation, learning_rate=LEARNING_RATE, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, train_sampling_strategy="sequential",
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,  # Trainer would drop `mask_spec` before collation
        fsdp="full_shard",
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": [layer_class(model).__name__]},
    )
    # A map-style dataset: accelerate's sampler splits it over ranks. Make the row count a
    # multiple of (ranks x batch size), or set dataloader_drop_last=True: to even the ranks it
    # repeats rows from the start, which then train twice (docs/training.md, Sharded training).
    dataset = OnePassDataset(args.out_dir)
    if sft:
        import datasets
        from transformers import AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        from onepass_prep.convert.tokenizer import qwen_tokenizer_dir

        config = SFTConfig(**options, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None,
                           bf16=False)
        rows = datasets.Dataset.from_parquet([str(path) for path in dataset.files])
        tokenizer = AutoTokenizer.from_pretrained(args.model or qwen_tokenizer_dir())
        onepass_trainer(SFTTrainer)(
            model=model, args=config, train_dataset=rows, data_collator=OnePassCollator(),
            processing_class=tokenizer, callbacks=[PrintLoss()],
        ).train()
    else:
        onepass_trainer(Trainer)(
            model=model, args=TrainingArguments(**options), train_dataset=dataset,
            data_collator=OnePassCollator(), callbacks=[PrintLoss()],
        ).train()


def main() -> None:
    args = parse_args()
    if args.launcher == "plain":
        plain(args)
    elif args.launcher == "accelerate":
        accelerate(args)
    else:
        trainer(args, sft=args.launcher == "sft")
    if dist.is_initialized():  # Trainer and Accelerator leave it up; gloo can abort at exit
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
