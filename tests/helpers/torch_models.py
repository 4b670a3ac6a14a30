"""Tiny random-weight models, summed losses, N-pass references and collated random batches
for the torch tests."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from helpers.torch_rows import chat_samples, pack, random_row, reference_visible
from onepass_prep.torch import OnePassCollator

VOCAB = 512
# A wide init makes attention far from uniform, so a wrong mask visibly changes the loss.
SIZE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.3,
)
CONFIGS = {"qwen3": Qwen3Config(**SIZE), "llama": LlamaConfig(**SIZE)}


def tiny_model(family: str, attn: str, seed: int = 0) -> torch.nn.Module:
    """A random-weight model; each gets its own config (from_config would share and mutate it)."""
    torch.manual_seed(seed)
    config = copy.deepcopy(CONFIGS[family])
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over labelled tokens (the causal-LM shift)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


def workload(seed: int = 0) -> tuple[list[tuple[list[int], int]], dict]:
    """Samples of five chats, and a batch of two rows holding them (three packed in one)."""
    rng = np.random.default_rng(seed)
    chats = [chat_samples(rng, turns) for turns in (3, 1, 4, 2, 3)]
    rows = [pack(chats[:3], ["a", "b", "c"]), pack(chats[3:], ["d", "e"])]
    return [s for chat in chats for s in chat], OnePassCollator(pad_to_multiple_of=64)(rows)


def n_pass(model: torch.nn.Module, samples: list[tuple[list[int], int]]) -> torch.Tensor:
    total = torch.zeros(())
    for tokens, start in samples:
        ids = torch.tensor([tokens])
        labels = ids.clone()
        labels[:, :start] = -100
        total = total + summed_loss(model(input_ids=ids).logits, labels)
    return total


def n_pass_objective(
    model: torch.nn.Module,
    chats: list[list[tuple[list[int], int]]],
    message_weights: list[list[float]],
    normalization: str,
) -> torch.Tensor:
    """An optimizer step's loss as an N-pass trainer averages it, every sample in a forward
    pass of its own (plain causal): the weighted token sum over the trained tokens (token), the
    mean over trained samples of their weighted token means (turn), or over conversations with
    trained tokens of their weighted token means (conversation). Weight 0: not trained."""
    total, units = torch.zeros((), dtype=torch.float64), 0
    for samples, weights in zip(chats, message_weights, strict=True):
        conversation, conversation_tokens = torch.zeros((), dtype=torch.float64), 0
        for (tokens, start), weight in zip(samples, weights, strict=True):
            if weight == 0:
                continue
            ids = torch.tensor([tokens])
            labels = ids.clone()
            labels[:, :start] = -100
            summed = summed_loss(model(input_ids=ids).logits, labels).double()
            trained = len(tokens) - start
            if normalization == "token":
                total, units = total + weight * summed, units + trained
            elif normalization == "turn":
                total, units = total + weight * summed / trained, units + 1
            else:
                conversation, conversation_tokens = conversation + weight * summed, conversation_tokens + trained
        if normalization == "conversation" and conversation_tokens:
            total, units = total + conversation / conversation_tokens, units + 1
    return total / units


def gradients(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def random_batch(seed: int, rows: int = 3, multiple: int = 128) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(seed)
    batch_rows = [random_row(rng, int(rng.integers(1, 40))) for _ in range(rows)]
    return batch_rows, OnePassCollator(pad_to_multiple_of=multiple)(batch_rows)


def dense_reference(rows: list[dict], length: int) -> torch.Tensor:
    """``[B, L, L]``: the FORMAT.md rule on real tokens, each padding token sees itself."""
    out = torch.zeros(len(rows), length, length, dtype=torch.bool)
    for b, row in enumerate(rows):
        n = row["num_tokens"]
        spec = row["mask_spec"]
        out[b, :n, :n] = torch.from_numpy(reference_visible(spec["seg_lens"], spec["seg_parents"]))
        out[b, range(n, length), range(n, length)] = True
    return out


class VocabWideTensors(TorchDispatchMode):
    """The most positions of any tensor as wide as the vocabulary (logits, their softmax, their
    gradient) that an operation computes, forward or backward (views of existing tensors, such
    as the head's transposed weight, hold nothing new)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.most = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[-1] == self.vocab:
                self.most = max(self.most, tensor.numel() // self.vocab)
        return out
