"""Torch runtime for onepass-prep shards: datasets, collator, tree attention masks, model hook,
mask-free tree attention, and the weighted loss with logits only where a token is trained
(plain loops, Trainer, SFTTrainer).

Imports torch, numpy and pyarrow only. See docs/training.md.
"""

from onepass_prep.format import FORMAT_VERSION, FormatError, validate_batch

from .collate import STRUCTURE_KEY, OnePassCollator
from .dataset import OnePassDataset, OnePassIterableDataset, check_vocab_size, max_token_id
from .hook import MaskKind, build_attention_mask, install_mask_hook
from .loss import LOSS_KEYS, forward_loss, onepass_loss, plain_token_mean, step_denominator
from .masks import block_mask, bool_mask, float_mask, tree_mask_mod
from .trainer import onepass_trainer
from .tree_attention import PLAN_KEY, TREE_ATTENTION, register_tree_attention, tree_plan

__all__ = [
    "FORMAT_VERSION",
    "LOSS_KEYS",
    "STRUCTURE_KEY",
    "PLAN_KEY",
    "TREE_ATTENTION",
    "FormatError",
    "MaskKind",
    "OnePassCollator",
    "OnePassDataset",
    "OnePassIterableDataset",
    "block_mask",
    "bool_mask",
    "build_attention_mask",
    "check_vocab_size",
    "float_mask",
    "forward_loss",
    "install_mask_hook",
    "max_token_id",
    "onepass_loss",
    "onepass_trainer",
    "plain_token_mean",
    "register_tree_attention",
    "step_denominator",
    "tree_mask_mod",
    "tree_plan",
    "validate_batch",
]
