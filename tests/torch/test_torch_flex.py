"""The FlexAttention path: ``block_mask`` builds its block tables from ``subtree_end`` alone.

On a CPU: the tables against the FORMAT.md mask (random forests, packed rows, padding, rows
whose end cuts a block), eager flex against sdpa with the dense mask, and compiled flex
(which reads the tables; eager does not) against sdpa over several row lengths without a
recompile per length. On a CUDA GPU: a tiny Qwen3 through the hook, forward and backward,
against N separate passes.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers.paths import ROOT, TESTS
from helpers.torch_models import gradients, summed_loss, tiny_model
from helpers.torch_rows import chat_samples, make_row, pack, random_row
from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

from onepass_prep.torch import OnePassCollator, block_mask, bool_mask, install_mask_hook

TABLES = (
    "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
    "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
)


def chain_row(rng: np.random.Generator) -> dict:
    """A 300-token trunk with two 200-token branches: long chains make full 128-blocks."""
    seg_lens, seg_parents = [300, 200, 200], [-1, 0, 0]
    return make_row(rng.integers(0, 500, 700).tolist(), [-100] * 700, seg_lens, seg_parents)


def batch_of(seed: int, multiple: int) -> tuple[list[dict], torch.Tensor]:
    """A short forest, a long packed forest, a chain-heavy row and a one-token row: padding
    of every size, several roots per row."""
    rng = np.random.default_rng(seed)
    rows = [
        random_row(rng, int(rng.integers(1, 40))),
        random_row(rng, int(rng.integers(150, 400))),
        chain_row(rng),
        random_row(rng, 1),
    ]
    return rows, OnePassCollator(pad_to_multiple_of=multiple)(rows)["subtree_end"]


def format_rule(rows: list[dict], length: int) -> torch.Tensor:
    """``[B, L, L]`` by the FORMAT.md rule (kv <= q, kv's segment an ancestor-or-self of q's,
    found by walking seg_parents), vectorised per segment pair; padding sees itself."""
    out = torch.zeros(len(rows), length, length, dtype=torch.bool)
    for b, row in enumerate(rows):
        lens, parents = row["mask_spec"]["seg_lens"], row["mask_spec"]["seg_parents"]
        ancestor = np.eye(len(lens), dtype=bool)  # ancestor[s, a]: a is s or an ancestor of s
        for s, parent in enumerate(parents):
            if parent != -1:
                ancestor[s] |= ancestor[parent]
        segment = np.repeat(np.arange(len(lens)), lens)
        n = len(segment)
        visible = ancestor[segment[:, None], segment[None, :]] & np.tri(n, dtype=bool)
        out[b, :n, :n] = torch.from_numpy(visible)
        out[b, range(n, length), range(n, length)] = True
    return out


def tiles(visible: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ``size`` x ``size`` tile of ``[B, L, L]``: any pair visible, every pair visible
    (pairs past the row's end count as not visible)."""
    batch, length, _ = visible.shape
    blocks = -(-length // size)
    padded = torch.zeros(batch, blocks * size, blocks * size, dtype=torch.bool)
    padded[:, :length, :length] = visible
    grid = padded.view(batch, blocks, size, blocks, size)
    return grid.any(4).any(2), grid.all(4).all(2)


def listed(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """A flex table (``counts [B, 1, R]``, ``indices [B, 1, R, C]``) as ``[B, R, C]`` bool:
    the first ``counts`` indices of each row are the listed tiles."""
    counts, indices = counts[:, 0], indices[:, 0].long()
    assert torch.equal(indices.sort(-1).values, torch.arange(indices.shape[-1]).expand_as(indices))
    keep = torch.arange(indices.shape[-1]) < counts[..., None]
    return torch.zeros(indices.shape, dtype=torch.bool).scatter_(-1, indices, keep)


@pytest.mark.parametrize("size, multiple", [(128, 128), (16, 16), (16, 8), (128, 16), (8, 1)])
@pytest.mark.parametrize("seed", range(4))
def test_block_tables_cover_exactly_the_visible_pairs(seed: int, size: int, multiple: int) -> None:
    """Every visible pair lies in a listed tile; a full tile holds only visible pairs; a partial
    tile holds both kinds (so no tile is visited in vain); an unlisted tile holds none. Both
    directions of the tables (the kernel's forward reads kv, its backward q) agree."""
    rows, structure = batch_of(seed, multiple)
    length = structure.shape[1]
    visible = format_rule(rows, length)
    assert torch.equal(bool_mask(structure)[:, 0], visible)
    mask = block_mask(structure, block_size=size)
    assert mask.shape == (len(rows), 1, length, length) and mask.BLOCK_SIZE == (size, size)
    some, every = tiles(visible, size)
    partial = listed(mask.kv_num_blocks, mask.kv_indices)
    full = listed(mask.full_kv_num_blocks, mask.full_kv_indices)
    assert not (partial & full).any()
    assert torch.equal(partial | full, some)  # visible pairs covered, empty tiles unlisted
    assert torch.equal(full, every)  # no hidden pair in a full tile, no full tile left partial
    assert torch.equal(listed(mask.q_num_blocks, mask.q_indices), partial.transpose(1, 2))
    assert torch.equal(listed(mask.full_q_num_blocks, mask.full_q_indices), full.transpose(1, 2))
    assert full.any() and partial.any() and (~some & torch.ones_like(some).tril()).any()
    # Partial tiles are finished by mask_mod inside the kernel: on every pair it is the rule.
    evaluated = create_mask(mask.mask_mod, len(rows), 1, length, length, device="cpu")
    assert torch.equal(evaluated[:, 0], visible)


@pytest.mark.parametrize("seed", range(3))
def test_block_tables_equal_create_block_masks_from_the_dense_mask(seed: int) -> None:
    """Byte for byte the tables flex's own builder derives by evaluating every pair."""
    rows, structure = batch_of(seed, 16)
    length = structure.shape[1]
    visible = format_rule(rows, length)
    mine = block_mask(structure, block_size=128)
    theirs = create_block_mask(
        lambda b, h, q, kv: visible[b, q, kv], len(rows), None, length, length,
        device="cpu", BLOCK_SIZE=128,
    )
    for name in TABLES:
        assert torch.equal(getattr(mine, name), getattr(theirs, name)), name


def test_block_mask_is_built_on_the_structures_device() -> None:
    """No host round trip and no dense evaluation: the meta device holds no data, so any
    .item(), .cpu() or data-dependent step would fail."""
    _, structure = batch_of(0, 128)
    mask = block_mask(structure.to("meta"))
    assert all(getattr(mask, name).device.type == "meta" for name in TABLES)


@pytest.mark.parametrize("seed", range(3))
def test_eager_flex_forward_equals_sdpa_with_the_dense_mask(seed: int) -> None:
    """Eager flex applies mask_mod to every pair (it does not read the tables): GQA, float32."""
    _, structure = batch_of(seed, 128)
    batch, length = structure.shape
    torch.manual_seed(seed)
    q = torch.randn(batch, 8, length, 16)
    k, v = torch.randn(batch, 2, length, 16), torch.randn(batch, 2, length, 16)
    with torch.no_grad():
        got = flex_attention(q, k, v, block_mask=block_mask(structure), enable_gqa=True)
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bool_mask(structure), enable_gqa=True
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


COMPILED = textwrap.dedent(
    """
    import json, numpy as np, torch
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    from helpers.torch_rows import make_row, random_row
    from onepass_prep.torch import OnePassCollator, block_mask, bool_mask
    # HELPERS
    torch.backends.mkldnn.enabled = False
    compiled = torch.compile(flex_attention)
    rng = np.random.default_rng(0)

    def attend(mask, q, k, v):
        with torch.no_grad():
            return compiled(q, k, v, block_mask=mask, enable_gqa=True)

    def ordered(dense):  # [B, R, C] bool -> flex's (counts, indices)
        order = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True)
        return dense.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    report = {"errors": []}
    for segments in (120, 200, 300, 420):  # row lengths 384 .. 1152: four lengths
        rows = [random_row(rng, segments), chain_row(rng)]
        structure = OnePassCollator()(rows)["subtree_end"]
        batch, length = structure.shape
        q = torch.randn(batch, 8, length, 16)
        k, v = torch.randn(batch, 2, length, 16), torch.randn(batch, 2, length, 16)
        mask = block_mask(structure)
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bool_mask(structure), enable_gqa=True)
        report["errors"].append(float((attend(mask, q, k, v) - want).abs().max()))
    report["graphs"] = counters["stats"]["unique_graphs"]
    # The kernel reads the tables: call a partial tile full (mask_mod skipped there), or
    # drop a full one, and the output changes.
    partial = listed(mask.kv_num_blocks, mask.kv_indices)
    full = listed(mask.full_kv_num_blocks, mask.full_kv_indices)
    promoted, dropped = partial.clone(), full.clone()
    promoted[tuple(partial.nonzero()[0])] = False
    dropped[tuple(full.nonzero()[0])] = False
    for p, f in ((promoted, full | ~promoted & partial), (partial, dropped)):
        wrong = BlockMask.from_kv_blocks(*ordered(p), *ordered(f), BLOCK_SIZE=128,
                                         mask_mod=mask.mask_mod, seq_lengths=(length, length))
        report.setdefault("wrong_tables", []).append(float((attend(wrong, q, k, v) - want).abs().max()))
    print(json.dumps(report))
    """
)


def test_compiled_flex_reads_the_tables_and_does_not_recompile_per_length() -> None:
    """Compiled flex (CPU inductor, the kernel that skips tiles by the tables) equals sdpa
    with the dense mask at four row lengths; dynamo compiles twice (the first length, then
    once with dynamic shapes), not once per length; and wrong tables give a wrong output.
    In a subprocess: fresh dynamo counters, and a crash cannot take pytest down."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [TESTS, ROOT]))}
    script = COMPILED.replace("# HELPERS", inspect.getsource(chain_row) + inspect.getsource(listed))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["errors"]) == 4 and max(report["errors"]) < 1e-5, report
    assert report["graphs"] <= 2, report
    assert min(report["wrong_tables"]) > 1e-2, report


def test_gpu_benchmark_refuses_without_cuda() -> None:
    """benchmarks/gpu.py imports and, with no CUDA device, exits at once with a clear reason."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py")], capture_output=True, text=True,
        timeout=300, env=env,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: flex_attention's backward runs only in its compiled GPU kernel",
)


def n_pass_on(model: torch.nn.Module, samples: list[tuple[list[int], int]]) -> torch.Tensor:
    """The N-pass reference on the model's device: each sample a causal pass of its own."""
    total = torch.zeros((), device=model.device)
    for tokens, start in samples:
        ids = torch.tensor([tokens], device=model.device)
        labels = ids.clone()
        labels[:, :start] = -100
        total = total + summed_loss(model(input_ids=ids).logits, labels)
    return total


@needs_cuda
def test_gpu_block_mask_equals_the_cpu_build() -> None:
    _, structure = batch_of(0, 128)
    on_gpu, on_cpu = block_mask(structure.cuda()), block_mask(structure)
    for name in TABLES:
        assert getattr(on_gpu, name).is_cuda, name
        assert torch.equal(getattr(on_gpu, name).cpu(), getattr(on_cpu, name)), name


@needs_cuda
def test_gpu_flex_model_forward_and_backward_equal_n_passes() -> None:
    """Tiny Qwen3, attn_implementation="flex_attention", through the hook (transformers
    compiles flex): the summed loss and every parameter gradient equal N separate sdpa
    passes, float32 without TF32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rng = np.random.default_rng(0)
    chats = [chat_samples(rng, turns) for turns in (3, 1, 4, 2, 3)]
    rows = [pack(chats[:3], ["a", "b", "c"]), pack(chats[3:], ["d", "e"])]
    samples = [sample for chat in chats for sample in chat]
    batch = {name: value.cuda() for name, value in OnePassCollator()(rows).items()}
    flex = tiny_model("qwen3", "flex_attention").cuda().train()
    reference = tiny_model("qwen3", "sdpa").cuda().train()
    install_mask_hook(flex)
    loss = summed_loss(flex(**batch).logits, batch["labels"])
    want = n_pass_on(reference, samples)
    got_grads, want_grads = gradients(flex, loss), gradients(reference, want)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    for name, grad in want_grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
