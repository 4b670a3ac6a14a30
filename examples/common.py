"""Shared by the examples: the command line and a tiny random-weight model for CPU demos."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from onepass_prep.torch import MaskKind


def parse_args(doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("out_dir", type=Path, help="output folder of `onepass-prep convert`")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps")
    parser.add_argument(
        "--accumulation", type=int, default=2, help="gradient-accumulation micro-batches per step"
    )
    parser.add_argument(
        "--attn", choices=["tree", "sdpa", "eager"], default="tree",
        help="tree attention (default: no L x L mask, so the README's 20k-token demo row fits a "
        "CPU), or a dense mask under sdpa or eager",
    )
    parser.add_argument(
        "--model", help="a causal LM to load with from_pretrained (default: tiny random Qwen3)"
    )
    return parser.parse_args()


def mask_kind(attn: str) -> MaskKind | None:
    """``install_mask_hook``'s kind for ``--attn``: the default for a dense mask."""
    return "tree" if attn == "tree" else None


def load_model(name: str | None, attn: str) -> torch.nn.Module:
    """The model to train; without a name, a random Qwen3 small enough for a CPU, whose Qwen3
    vocabulary makes the head its largest part (as at long context)."""
    attn = "sdpa" if attn == "tree" else attn  # install_mask_hook(kind="tree") switches it
    if name is not None:
        return AutoModelForCausalLM.from_pretrained(name, attn_implementation=attn)
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)
