"""Torch runtime for onepass-prep shards: datasets, collator, tree attention masks, model hook,
mask-free tree attention.

Imports torch, numpy and pyarrow only. See docs/training.md.
"""

from onepass_prep.format import FORMAT_VERSION, FormatError, validate_batch

from .collate import STRUCTURE_KEY, OnePassCollator
from .dataset import OnePassDataset, OnePassIterableDataset, check_vocab_size, max_token_id
from .hook import MaskKind, build_attention_mask, install_mask_hook
from .masks import block_mask, bool_mask, float_mask, tree_mask_mod
from .tree_attention import PLAN_KEY, TREE_ATTENTION, register_tree_attention, tree_plan

__all__ = [
    "FORMAT_VERSION",
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
    "install_mask_hook",
    "max_token_id",
    "register_tree_attention",
    "tree_mask_mod",
    "tree_plan",
    "validate_batch",
]
