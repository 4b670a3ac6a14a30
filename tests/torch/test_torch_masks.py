"""Collator padding and the three mask builders against the FORMAT.md rule."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers.paths import ROOT, TESTS
from helpers.torch_models import dense_reference, random_batch
from helpers.torch_rows import random_row
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from onepass_prep.torch import OnePassCollator, block_mask, bool_mask, float_mask, tree_mask_mod


@pytest.mark.parametrize("multiple", [128, 16, 1])
def test_collator_pads_to_multiple_with_inert_tokens(multiple: int) -> None:
    rows, batch = random_batch(0, multiple=multiple)
    longest = max(r["num_tokens"] for r in rows)
    length = batch["input_ids"].shape[1]
    assert length % multiple == 0 and longest <= length < longest + multiple
    assert set(batch) == {"input_ids", "labels", "position_ids", "subtree_end", "loss_weights", "loss_units"}
    for b, row in enumerate(rows):
        n = row["num_tokens"]
        assert batch["input_ids"][b, :n].tolist() == row["input_ids"]
        assert batch["labels"][b, :n].tolist() == row["labels"]
        assert batch["position_ids"][b, :n].tolist() == row["position_ids"]
        assert (batch["labels"][b, n:] == -100).all()
        assert batch["subtree_end"][b, n:].tolist() == list(range(n, length))
        assert batch["loss_weights"][b, :n].tolist() == row["loss_weights"]
        assert (batch["loss_weights"][b, n:] == 0).all()
        assert batch["loss_units"][b] == row["loss_units"]
    weights = batch.pop("loss_weights")
    assert weights.dtype == torch.float32 and batch["loss_units"].shape == (len(rows),)
    assert all(t.dtype == torch.int64 for t in batch.values())


@pytest.mark.parametrize("seed", range(6))
def test_dense_masks_match_reference(seed: int) -> None:
    rows, batch = random_batch(seed, multiple=8)
    expected = dense_reference(rows, batch["input_ids"].shape[1])
    visible = bool_mask(batch["subtree_end"])
    assert visible.shape == (len(rows), 1, *expected.shape[1:])
    assert torch.equal(visible[:, 0], expected)
    additive = float_mask(batch["subtree_end"], torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive[:, 0] == 0, expected)
    assert (additive[:, 0][~expected] == torch.finfo(torch.bfloat16).min).all()


def test_collator_names_trainer_setting_when_mask_spec_was_dropped() -> None:
    row = random_row(np.random.default_rng(0), 3)
    del row["mask_spec"]
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        OnePassCollator()([row])


@pytest.mark.parametrize("seed", range(3))
def test_block_mask_matches_dense_reference(seed: int) -> None:
    rows, batch = random_batch(seed, rows=2, multiple=16)
    length = batch["input_ids"].shape[1]
    expected = dense_reference(rows, length)
    mask = block_mask(batch["subtree_end"], block_size=16)
    # The mask_mod on every (q, kv) pair, through flex's own evaluator.
    evaluated = create_mask(mask.mask_mod, len(rows), 1, length, length, device="cpu")
    assert torch.equal(evaluated[:, 0], expected)
    # The block structure equals the one flex derives from the dense reference itself.
    from_dense = create_block_mask(
        lambda b, h, q, kv: expected[b, q, kv], len(rows), None, length, length,
        device="cpu", BLOCK_SIZE=16,
    )
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(mask, name), getattr(from_dense, name)), name
    blocks = (length // 16) ** 2 * len(rows)
    assert int(mask.kv_num_blocks.sum()) + int(mask.full_kv_num_blocks.sum()) < blocks  # sparse


@pytest.mark.parametrize("seed", range(4))
def test_mask_mod_reads_only_the_per_token_structure(seed: int) -> None:
    """The mask_mod, given only subtree_end, on every (b, h, q, kv) of the batch at once
    (broadcast index tensors, as flex calls it) equals the FORMAT.md rule walked over
    seg_parents; heads change nothing."""
    rows, batch = random_batch(seed, rows=3, multiple=8)
    length = batch["input_ids"].shape[1]
    expected = dense_reference(rows, length)
    mod = tree_mask_mod(batch["subtree_end"].clone())
    b = torch.arange(len(rows))[:, None, None, None]
    h = torch.arange(2)[None, :, None, None]
    q = torch.arange(length)[None, None, :, None]
    kv = torch.arange(length)[None, None, None, :]
    evaluated = torch.broadcast_to(mod(b, h, q, kv), (len(rows), 2, length, length))
    assert evaluated.dtype == torch.bool
    assert torch.equal(evaluated[:, 0], expected) and torch.equal(evaluated[:, 1], expected)
    assert expected.any() and (~expected & torch.ones_like(expected).tril()).any()  # not all-causal


FLEX_VS_SDPA = textwrap.dedent(
    """
    import numpy as np, torch
    from torch.nn.attention.flex_attention import flex_attention
    from helpers.torch_rows import random_row
    from onepass_prep.torch import OnePassCollator, block_mask, bool_mask
    rng = np.random.default_rng(0)
    rows = [random_row(rng, 30), random_row(rng, 12)]
    structure = OnePassCollator(pad_to_multiple_of=128)(rows)["subtree_end"]
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, structure.shape[1], 16) for _ in range(3))
    with torch.no_grad():
        flex = flex_attention(q, k, v, block_mask=block_mask(structure))
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask(structure))
    print(float((flex - sdpa).abs().max()))
    """
)


def test_flex_attention_forward_equals_sdpa_with_dense_mask() -> None:
    """Forward only (flex has no CPU backward); in a subprocess in case flex crashes.
    tests/torch/test_torch_flex.py checks the block tables and compiled flex."""
    done = subprocess.run(
        [sys.executable, "-c", FLEX_VS_SDPA], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [TESTS, ROOT]))},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-5


def test_masks_are_built_on_the_structures_device() -> None:
    """No host round trip: the meta device has no data, so any .cpu()/.numpy() would fail."""
    _, batch = random_batch(2, rows=2, multiple=8)
    structure = batch["subtree_end"].to("meta")
    assert bool_mask(structure).device.type == "meta"
    assert float_mask(structure, torch.float16).device.type == "meta"
