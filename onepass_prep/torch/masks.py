"""Attention masks from ``subtree_end``, built on whatever device it lives on.

Token ``q`` may attend to token ``kv`` iff ``kv <= q <= subtree_end[kv]``: rows are in
depth-first pre-order, so ``kv``'s descendants are exactly ``kv + 1 .. subtree_end[kv]`` and
this is the FORMAT.md rule "kv <= q and kv's segment is q's segment or an ancestor of it".
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


def bool_mask(subtree_end: torch.Tensor) -> torch.Tensor:
    """``[B, 1, L, L]``, True = visible. For sdpa only: eager would add it as 0/1."""
    length = subtree_end.shape[-1]
    position = torch.arange(length, device=subtree_end.device)
    q, kv = position[:, None], position[None, :]
    return ((kv <= q) & (q <= subtree_end[:, None, :]))[:, None]


def float_mask(subtree_end: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, L, L]`` additive: 0 where visible, the dtype's minimum elsewhere (eager, sdpa)."""
    visible = bool_mask(subtree_end)
    mask = torch.zeros(visible.shape, dtype=dtype, device=subtree_end.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)


def tree_mask_mod(subtree_end: torch.Tensor) -> Callable:
    """FlexAttention ``mask_mod`` reading only the O(L) ``subtree_end``."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (kv <= q) & (q <= subtree_end[b, kv])

    return mask_mod


@cache
def _compiled_create_block_mask() -> Callable:
    return torch.compile(create_block_mask)


def block_mask(subtree_end: torch.Tensor, block_size: int = 128, compile: bool = True) -> BlockMask:
    """FlexAttention ``BlockMask`` (heads broadcast) for ``attn_implementation="flex_attention"``.

    Uncompiled, ``create_block_mask`` evaluates ``mask_mod`` on all L x L pairs at once;
    compiled, it works block by block. Compiling costs seconds once, then once more when the
    length first changes (shapes turn dynamic); new batches reuse the compiled code.
    """
    build = _compiled_create_block_mask() if compile else create_block_mask
    batch, length = subtree_end.shape
    return build(
        tree_mask_mod(subtree_end), batch, None, length, length,
        device=subtree_end.device, BLOCK_SIZE=block_size,
    )
