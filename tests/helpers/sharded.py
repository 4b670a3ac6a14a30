"""Two gloo ranks training tiny models under FSDP2 (``fully_shard``), one step each, against one
process over the same rows: run as ``python -m helpers.sharded RENDEZVOUS OUT`` (spawns its
ranks), it writes ``OUT/results.json`` for tests/torch/test_torch_sharded.py.

Per configuration: the step's loss summed over ranks, every parameter's gradient (gathered
whole), the most positions any vocabulary-wide tensor held in the ranks' forward and backward,
and the same loss and gradients of one process (the full-logits path, no FSDP); for bf16 also
the loss of one process with bf16 parameters.
"""

from __future__ import annotations

import copy
import datetime
import faulthandler
import json
import os
import signal
import sys
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, Gemma3TextConfig, PretrainedConfig, Qwen3Config
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

from helpers.torch_models import VocabWideTensors

VOCAB = 509  # no length the tree convolution lays out (a multiple of its taps) is this wide
CHUNK = 7  # positions per head chunk
SIZE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.1,
)
LINEAR = dict(
    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
)
MODELS: dict[str, Callable[[], PretrainedConfig]] = {
    "qwen3": lambda: Qwen3Config(**SIZE),
    "qwen3-tied": lambda: Qwen3Config(**SIZE, tie_word_embeddings=True),
    # sliding windows of 5 tokens in every other layer: rows are far longer
    "gemma3": lambda: Gemma3TextConfig(**{**SIZE, "num_hidden_layers": 4}, sliding_window=5,
                                       sliding_window_pattern=2),
    "qwen3_5": lambda: Qwen3_5TextConfig(
        **{**SIZE, "num_hidden_layers": 3}, **LINEAR,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
    ),
}
# name -> (model, how it is sharded / trained)
CASES = {
    "qwen3": ("qwen3", "layers"),
    "qwen3-tied": ("qwen3-tied", "layers"),
    "qwen3-head-unit": ("qwen3", "head"),  # the head an FSDP unit of its own
    "gemma3": ("gemma3", "layers"),
    "qwen3_5": ("qwen3_5", "layers"),
    "qwen3-bf16": ("qwen3", "bf16"),  # MixedPrecisionPolicy(bf16 parameters, fp32 reduction)
    "qwen3-checkpointed": ("qwen3", "checkpointed"),  # activation checkpointing of every layer
}
ATTENTION = {"gemma3": "eager"}


def build(model: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        copy.deepcopy(MODELS[model]()), attn_implementation=ATTENTION.get(model, "sdpa"), dtype=torch.float32
    )


def step_rows() -> list[dict]:
    """Six rows of packed chats with message weights (0 among them), turn normalization."""
    from helpers.torch_rows import chat_samples, pack

    rng = np.random.default_rng(7)
    chats = [chat_samples(rng, turns) for turns in (3, 1, 4, 2, 3, 2, 1, 3, 2)]
    weights = [[1, 0.5, 2], [1], [0.25, 1, 0, 1.5], [0, 0.75], [1, 0.5, 1], [2, 1], [1], [1, 1, 0.5], [3, 1]]
    groups = [[0], [1, 2], [3], [4, 5], [6], [7, 8]]
    return [pack([chats[c] for c in g], [f"c{c}" for c in g], [weights[c] for c in g], "turn") for g in groups]


def micro_batches(rows: list[dict]) -> list[dict]:
    """Two micro-batches: two rows padded to one length, then one row."""
    from onepass_prep.torch import OnePassCollator

    collate = OnePassCollator(pad_to_multiple_of=16)
    return [collate(rows[:2]), collate(rows[2:])]


def shard(model: torch.nn.Module, how: str) -> torch.nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if how == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if how == "checkpointed":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    if how == "head":
        fully_shard(model.lm_head, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def sharded_step(case: str, rank: int, world: int, rows: list[dict]) -> dict:
    from onepass_prep.torch import forward_loss, install_mask_hook, step_denominator
    from onepass_prep.torch.head import output_head

    name, how = CASES[case]
    model = build(name)
    install_mask_hook(model)
    model = shard(model, how)
    assert output_head(model) is not None, case
    mine = micro_batches(rows[rank::world])
    denominator = step_denominator(mine)
    total = torch.zeros((), dtype=torch.float64)
    with VocabWideTensors(VOCAB) as seen:
        for i, batch in enumerate(mine):
            model.set_requires_gradient_sync(i == len(mine) - 1)  # accumulate, then reduce
            loss, outputs = forward_loss(model, batch, denominator)
            assert outputs.logits.shape[1] == 0, case  # the model's own head saw no position
            (loss * world).backward()  # FSDP averages the ranks' gradients
            total += loss.detach().double()
    dist.all_reduce(total)
    most = torch.tensor(seen.most)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    grads = {n: p.grad.full_tensor().double().tolist() for n, p in model.named_parameters()}
    trained = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches(rows))
    return {"loss": float(total), "grads": grads, "most": int(most), "trained": trained}


def one_process_loss(model: torch.nn.Module, rows: list[dict], full_logits: bool) -> torch.Tensor:
    """The step's loss of one process over both ranks' micro-batches."""
    from onepass_prep.torch import forward_loss, install_mask_hook, step_denominator

    install_mask_hook(model)
    everything = micro_batches(rows[0::2]) + micro_batches(rows[1::2])
    denominator = step_denominator(everything)
    losses = (forward_loss(model, b, denominator, full_logits=full_logits)[0] for b in everything)
    return sum(loss.float() for loss in losses)


def one_process(case: str, rows: list[dict]) -> dict:
    model = build(CASES[case][0])
    loss = one_process_loss(model, rows, full_logits=True)
    loss.backward()
    return {"loss": float(loss), "grads": {n: p.grad.double().tolist() for n, p in model.named_parameters()}}


def one_process_bf16_loss(case: str, rows: list[dict]) -> float:
    """The step's loss of one process whose parameters are bf16 and buffers (RoPE's inverse
    frequencies) are not, which is what ``MixedPrecisionPolicy(param_dtype=bf16)`` computes
    with: the same rounding as the sharded run, so only the sum's order differs."""
    model = build(CASES[case][0])
    for parameter in model.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)
    with torch.no_grad():
        return float(one_process_loss(model, rows, full_logits=False))


def run(rank: int, world: int, init: str, out: str) -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # where it hangs, if it does
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # it re-plans every new sequence length (tests/torch/conftest.py)
    import onepass_prep.torch.head as head

    head.CHUNK_ELEMENTS = CHUNK * VOCAB
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    rows = step_rows()
    results = {case: sharded_step(case, rank, world, rows) for case in CASES}
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        for case, result in results.items():
            result["one_process"] = one_process(case, rows)
            if CASES[case][1] == "bf16":
                result["one_process_bf16_loss"] = one_process_bf16_loss(case, rows)
        with open(os.path.join(out, "results.json"), "w") as file:
            json.dump(results, file)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no destructors after the group is gone (see test_torch_weighted.py's DDP test)


if __name__ == "__main__":
    mp.spawn(run, args=(2, sys.argv[1], sys.argv[2]), nprocs=2)
