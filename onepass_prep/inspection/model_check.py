"""`verify --model-check`: a tiny random-weight Qwen3 gives every trained token the same
loss in the rows as in its own N-pass sample. Imports torch only when called.

Each sample runs alone with a plain causal mask. Each tree of a row runs alone with its
dense FORMAT.md mask (trees never see each other, so this is the row's forward pass), up
to TREE_LIMIT tokens; longer trees are counted as not checked. The loss of a (context,
target) pair depends on nothing else, so a row token is compared with any sample token of
the same key. Token ids are renumbered densely over the samples' vocabulary (the weights
are random, so only which tokens are equal matters): the output layer then has thousands of
rows instead of 150k, which is most of the work.
"""

from __future__ import annotations

import numpy as np

from onepass_prep.inspection.pairs import row_keys
from onepass_prep.inspection.runs import Run, iter_rows

TREE_LIMIT = 4096
TOLERANCE = 1e-4
HEAD_CHUNK = 256  # positions per lm_head call, so logits stay small for any vocabulary


def check_losses(run: Run, expected, expected_keys, powers, report) -> str:
    """Compare losses; add problems to `report`; return a one-line summary."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model is tiny: more threads only add overhead
    try:
        return _check(run, expected, expected_keys, powers, report)
    finally:
        torch.set_num_threads(threads)


def _check(run: Run, expected, expected_keys, powers, report) -> str:
    import torch


    torch.manual_seed(0)
    vocabulary = np.unique(np.concatenate([np.zeros(1, np.int64)] + [e.ids for e in expected]))
    longest = max((len(e.ids) for e in expected), default=1)
    model = _tiny_qwen3(len(vocabulary) + 1, longest)

    def dense(ids: np.ndarray) -> np.ndarray:
        """Index in the vocabulary; ids outside it (seen by no trained token) share one."""
        index = np.minimum(np.searchsorted(vocabulary, ids), len(vocabulary) - 1)
        return np.where(vocabulary[index] == ids, index, len(vocabulary))

    reference: dict[tuple, float] = {}
    with torch.no_grad():
        for sample, sample_keys in zip(expected, expected_keys, strict=True):
            targets = np.arange(sample.start, len(sample.ids))
            losses = _losses(model, dense(sample.ids), np.arange(len(sample.ids)), None, targets)
            for key, loss in zip(map(tuple, sample_keys.tolist()), losses, strict=True):
                reference.setdefault(key, loss)
        compared = skipped = 0
        worst = 0.0
        for row in iter_rows(run):
            found, labelled = row_keys(row, powers)
            for start, end in row.trees:
                inside = (labelled >= start) & (labelled < end)
                if not inside.any():
                    continue
                if end - start > TREE_LIMIT:
                    skipped += 1
                    continue
                mask = _tree_mask(row, start, end)
                losses = _losses(
                    model, dense(row.input_ids[start:end]), row.position_ids[start:end], mask,
                    labelled[inside] - start,
                )
                for key, j, loss in zip(found[inside].tolist(), labelled[inside], losses, strict=True):
                    difference = abs(loss - reference[tuple(key)])
                    worst = max(worst, difference)
                    compared += 1
                    if difference > TOLERANCE:
                        report.problem(
                            f"row {row.number}, token {j}: loss {loss:.6f} in one pass, "
                            f"{reference[tuple(key)]:.6f} in its N-pass sample"
                        )
    note = f"; {skipped} trees longer than {TREE_LIMIT} tokens not checked" if skipped else ""
    return f"{compared:,} token losses compared, largest difference {worst:.2e}{note}"


def _tiny_qwen3(vocab: int, longest: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=max(8192, longest), tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(config).eval()


def _tree_mask(row, start: int, end: int) -> np.ndarray:
    """visible[q, kv] for the tree's tokens: kv <= q <= subtree_end[kv]."""
    tokens = np.arange(start, end)
    reach = row.subtree_end[start:end]
    return (tokens[None, :] <= tokens[:, None]) & (tokens[:, None] <= reach[None, :])


def _losses(model, ids, positions, mask, targets: np.ndarray) -> list[float]:
    """Cross-entropy of predicting ids[t] from position t - 1, for each t in `targets`."""
    import torch

    ids_t = torch.as_tensor(np.asarray(ids, np.int64))[None]
    kwargs = {"position_ids": torch.as_tensor(np.asarray(positions, np.int64))[None]}
    if mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(mask)[None, None]
    hidden = model.model(input_ids=ids_t, **kwargs).last_hidden_state[0]
    targets_t = torch.as_tensor(targets, dtype=torch.long)
    losses = []
    for chunk in targets_t.split(HEAD_CHUNK):
        logits = model.lm_head(hidden[chunk - 1])
        losses += torch.nn.functional.cross_entropy(logits, ids_t[0, chunk], reduction="none").tolist()
    return losses
