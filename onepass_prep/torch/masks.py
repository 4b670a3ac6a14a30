"""Attention masks from ``subtree_end``, built on whatever device it lives on.

Token ``q`` may attend to token ``kv`` iff ``kv <= q <= subtree_end[kv]``: rows are in
depth-first pre-order, so ``kv``'s descendants are exactly ``kv + 1 .. subtree_end[kv]`` and
this is the FORMAT.md rule "kv <= q and kv's segment is q's segment or an ancestor of it".

The FlexAttention ``BlockMask`` is built from block tables computed directly from
``subtree_end``, never from an L x L evaluation and never through ``torch.compile``. For the
``block_size`` x ``block_size`` tile of query block ``I = [q0, q1]`` and key block
``J = [k0, k1]``:

- some pair is visible iff ``k0 <= q1`` and ``max(subtree_end[J]) >= q0`` (when ``k0 <= q1``
  every key of ``J`` is at most ``q1``; the key that reaches furthest decides);
- every pair is visible iff ``k1 <= q0`` and ``min(subtree_end[J]) >= q1``, and both blocks
  lie inside the row (a tile cut by the row's end is never full, as in ``create_block_mask``).

Those are exact, so the tables are the ones ``create_block_mask`` derives from the dense
mask: the fewest tiles the kernel must visit, and ``mask_mod`` runs only on partial tiles.
The work is two reductions over ``subtree_end`` (O(L)) and a few element-wise operations and
sorts over ``B x (L / block_size)²`` tiles (65,536 per 32k-token row), all on the device in
eager torch: no host round trip, nothing to compile, so a new row length costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask


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


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, R, C]`` bool -> per row the count of True tiles and all column indices, the True
    ones first in ascending order (flex's layout), as ``[B, 1, R]`` and ``[B, 1, R, C]`` int32."""
    counts = tiles.sum(-1, dtype=torch.int32)
    indices = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts[:, None].contiguous(), indices.to(torch.int32)[:, None].contiguous()


def block_mask(subtree_end: torch.Tensor, block_size: int = 128) -> BlockMask:
    """FlexAttention ``BlockMask`` (heads broadcast) for ``attn_implementation="flex_attention"``,
    from per-key-block minima and maxima of ``subtree_end`` (see the module docstring).

    Any ``L`` works; the collator's default (a multiple of 128) avoids tiles cut by the row's
    end. ``mask_mod`` reads ``subtree_end`` padded to whole blocks (a padded key sees only
    itself), so it never indexes past the tensor even in a tile that the row's end cuts.
    """
    batch, length = subtree_end.shape
    device = subtree_end.device
    blocks = -(-length // block_size)
    position = torch.arange(blocks * block_size, device=device)
    padded = torch.cat([subtree_end, position[length:].expand(batch, -1)], dim=1)
    per_block = padded.view(batch, blocks, block_size)
    reach_min, reach_max = per_block.amin(-1), per_block.amax(-1)  # [B, blocks], per key block
    first = position[::block_size]
    last = first + block_size - 1
    q_first, q_last = first[:, None], last[:, None]  # query blocks down, key blocks across
    some = (first[None, :] <= q_last) & (reach_max[:, None, :] >= q_first)
    inside = last < length
    every = (
        (last[None, :] <= q_first)
        & (reach_min[:, None, :] >= q_last)
        & (inside[:, None] & inside[None, :])
    )
    kv_num_blocks, kv_indices = _ordered(some & ~every)
    full_kv_num_blocks, full_kv_indices = _ordered(every)
    return BlockMask.from_kv_blocks(
        kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
        BLOCK_SIZE=block_size, mask_mod=tree_mask_mod(padded), seq_lengths=(length, length),
    )
