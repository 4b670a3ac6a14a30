"""Torch runtime for onepass-prep shards: datasets, collator, tree attention masks, model hook.

Imports torch, numpy and pyarrow only. See docs/training.md.
"""

from .collate import STRUCTURE_KEY, OnePassCollator
from .dataset import OnePassDataset, OnePassIterableDataset, check_vocab_size, max_token_id
from .format import FORMAT_VERSION, FormatError
from .hook import MaskKind, build_attention_mask, install_mask_hook
from .masks import block_mask, bool_mask, float_mask, tree_mask_mod
from .validate import validate_batch

__all__ = [
    "FORMAT_VERSION",
    "STRUCTURE_KEY",
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
    "tree_mask_mod",
    "validate_batch",
]
