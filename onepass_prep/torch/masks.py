"""Attention masks from ``subtree_end`` (and, for window layers, ``position_ids``), built on
whatever device they live on.

Token ``q`` may attend to token ``kv`` iff ``kv <= q <= subtree_end[kv]``: rows are in
depth-first pre-order, so ``kv``'s descendants are exactly ``kv + 1 .. subtree_end[kv]`` and
this is the FORMAT.md rule "kv <= q and kv's segment is q's segment or an ancestor of it".
A sliding-window or chunked layer also needs ``p[q] < limit[kv]`` with ``p = position_ids``
(``key_limits``): ``p[kv] + W`` for a window of ``W`` (transformers' ``q - kv < W``, on the
N-pass positions), the end of ``kv``'s chunk for chunks of ``C``. Along a path positions grow
by one per token, so this keeps exactly the pairs that N-pass keeps.

The FlexAttention ``BlockMask`` is built from block tables computed directly from
``subtree_end``, never from an L x L evaluation and never through ``torch.compile``. For the
``block_size`` x ``block_size`` tile of query block ``I = [q0, q1]`` and key block
``J = [k0, k1]``:

- some pair is visible iff ``k0 <= q1`` and ``max(subtree_end[J]) >= q0`` (when ``k0 <= q1``
  every key of ``J`` is at most ``q1``; the key that reaches furthest decides);
- every pair is visible iff ``k1 <= q0`` and ``min(subtree_end[J]) >= q1``, and both blocks
  lie inside the row (a tile cut by the row's end is never full, as in ``create_block_mask``).

With a limit, a tile is full iff it is full by the tree and ``max(p[I]) < min(limit[J])``
(every query of ``I`` then descends from every key of ``J``). Whether a tile has a visible
pair is decided per key and query block: key ``kv`` of an earlier block sees into ``I``'s part
of its subtree, ``[q0, min(subtree_end[kv], q1)]``, whose smallest position is ``I``'s minimum
(when the subtree runs past ``I``) or the prefix minimum of ``I`` up to ``subtree_end[kv]``;
a key always sees itself in its own block. That is ``L x L / block_size`` booleans (8M per
32k-token row), still nothing L x L.

Those are exact, so the tables are the ones ``create_block_mask`` derives from the dense
mask: the fewest tiles the kernel must visit, and ``mask_mod`` runs only on partial tiles.
The work is reductions over ``subtree_end`` (O(L)) and a few element-wise operations and
sorts over ``B x (L / block_size)²`` tiles (65,536 per 32k-token row), all on the device in
eager torch: no host round trip, nothing to compile, so a new row length costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask


def key_limits(position_ids: torch.Tensor, window: int | None = None, chunk: int | None = None) -> torch.Tensor:
    """``[B, L]``: per key, the first query position that no longer sees it (a sliding window
    of ``window``, or chunks of ``chunk``)."""
    if window is not None and chunk is None:
        return position_ids + window
    if chunk is None or window is not None:
        raise ValueError("give a window or a chunk size")
    return (torch.div(position_ids, chunk, rounding_mode="floor") + 1) * chunk


def bool_mask(
    subtree_end: torch.Tensor, position_ids: torch.Tensor | None = None, limit: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, 1, L, L]``, True = visible. For sdpa only: eager would add it as 0/1. With
    ``limit`` (``key_limits``) also ``position_ids[q] < limit[kv]``."""
    length = subtree_end.shape[-1]
    position = torch.arange(length, device=subtree_end.device)
    q, kv = position[:, None], position[None, :]
    visible = (kv <= q) & (q <= subtree_end[:, None, :])
    if limit is not None:
        if position_ids is None:
            raise ValueError("a limit needs the position_ids")
        visible &= position_ids[:, :, None] < limit[:, None, :]
    return visible[:, None]


def float_mask(
    subtree_end: torch.Tensor,
    dtype: torch.dtype,
    position_ids: torch.Tensor | None = None,
    limit: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, 1, L, L]`` additive: 0 where visible, the dtype's minimum elsewhere (eager, sdpa)."""
    visible = bool_mask(subtree_end, position_ids, limit)
    mask = torch.zeros(visible.shape, dtype=dtype, device=subtree_end.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)


def tree_mask_mod(
    subtree_end: torch.Tensor, position_ids: torch.Tensor | None = None, limit: torch.Tensor | None = None
) -> Callable:
    """FlexAttention ``mask_mod`` reading only the O(L) ``subtree_end`` (and limits)."""
    if limit is None:

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return (kv <= q) & (q <= subtree_end[b, kv])

        return mask_mod
    if position_ids is None:
        raise ValueError("a limit needs the position_ids")

    def window_mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (kv <= q) & (q <= subtree_end[b, kv]) & (position_ids[b, q] < limit[b, kv])

    return window_mask_mod


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, R, C]`` bool -> per row the count of True tiles and all column indices, the True
    ones first in ascending order (flex's layout), as ``[B, 1, R]`` and ``[B, 1, R, C]`` int32."""
    counts = tiles.sum(-1, dtype=torch.int32)
    indices = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts[:, None].contiguous(), indices.to(torch.int32)[:, None].contiguous()


def block_mask(
    subtree_end: torch.Tensor,
    block_size: int = 128,
    position_ids: torch.Tensor | None = None,
    limit: torch.Tensor | None = None,
) -> BlockMask:
    """FlexAttention ``BlockMask`` (heads broadcast) for ``attn_implementation="flex_attention"``,
    from per-key-block minima and maxima of ``subtree_end`` (see the module docstring); with
    ``limit``, a sliding-window or chunked layer's.

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
    inside = last < length
    every = (
        (last[None, :] <= q_first)
        & (reach_min[:, None, :] >= q_last)
        & (inside[:, None] & inside[None, :])
    )
    if limit is None:
        some = (first[None, :] <= q_last) & (reach_max[:, None, :] >= q_first)
        mask_mod = tree_mask_mod(padded)
    else:
        if position_ids is None:
            raise ValueError("a limit needs the position_ids")
        tail = torch.zeros(batch, blocks * block_size - length, dtype=position_ids.dtype, device=device)
        depth = torch.cat([position_ids, tail], dim=1)
        reach = torch.cat([limit, tail + 1], dim=1)  # a padded key (position 0) sees itself
        some = _some_within_limits(padded, depth, reach, block_size)
        depth_max = depth.view(batch, blocks, block_size).amax(-1)
        limit_min = reach.view(batch, blocks, block_size).amin(-1)
        every &= depth_max[:, :, None] < limit_min[:, None, :]
        mask_mod = tree_mask_mod(padded, depth, reach)
    kv_num_blocks, kv_indices = _ordered(some & ~every)
    full_kv_num_blocks, full_kv_indices = _ordered(every)
    return BlockMask.from_kv_blocks(
        kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
        BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(length, length),
    )


def _some_within_limits(
    reach: torch.Tensor, depth: torch.Tensor, limit: torch.Tensor, block_size: int
) -> torch.Tensor:
    """``[B, I, J]``: does tile (query block I, key block J) hold a visible pair, for keys
    with a position limit (module docstring). All inputs ``[B, blocks * block_size]``."""
    batch, padded_length = reach.shape
    blocks = padded_length // block_size
    per_block = depth.view(batch, blocks, block_size)
    block_min = per_block.amin(-1)  # [B, I]
    prefix_min = per_block.cummin(-1).values.view(batch, padded_length)
    key_block = torch.arange(padded_length, device=reach.device) // block_size
    reach_block = reach // block_size
    query_block = torch.arange(blocks, device=reach.device)
    # Key kv (rows) against query block I (columns): I strictly inside kv's reach, or I the
    # block where the reach ends (prefix minimum up to subtree_end[kv]).
    after = query_block[None, None, :] > key_block[None, :, None]
    through = (query_block[None, None, :] < reach_block[:, :, None]) & (block_min[:, None, :] < limit[:, :, None])
    ending = (query_block[None, None, :] == reach_block[:, :, None]) & (
        prefix_min.gather(1, reach)[:, :, None] < limit[:, :, None]
    )
    sees = (after & (through | ending)) | (query_block[None, None, :] == key_block[None, :, None])
    return sees.view(batch, blocks, block_size, blocks).any(2).transpose(1, 2)
