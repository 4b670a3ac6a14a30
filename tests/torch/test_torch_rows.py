"""The hand-built rows of helpers.torch_rows are what docs/FORMAT.md describes."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.torch_rows import (
    IGNORE,
    NORMALIZATIONS,
    chat_samples,
    pack,
    random_row,
    reference_visible,
    table_of,
)

from onepass_prep.format import validate_batch


@pytest.mark.parametrize("seed", range(5))
def test_random_rows_are_valid_and_preorder(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = [random_row(rng, int(rng.integers(1, 30)), weighted=bool(seed % 2)) for _ in range(20)]
    validate_batch(table_of(rows), "mem", 0)
    for row in rows:  # pre-order: every parent is on the path to the previous segment
        parents = row["mask_spec"]["seg_parents"]
        for s in range(1, len(parents)):
            path, a = set(), s - 1
            while a != -1:
                path.add(a)
                a = parents[a]
            assert parents[s] == -1 or parents[s] in path


def test_layout_gives_every_trained_token_its_context() -> None:
    rng = np.random.default_rng(0)
    samples = chat_samples(rng, 4) + [([7, 8, 9], 1), ([7, 8, 9], 1)]  # identical, not merged
    row = pack([samples], ["c"])
    validate_batch(table_of([row]), "mem", 0)
    ids, labels = row["input_ids"], row["labels"]
    spec = row["mask_spec"]
    visible = reference_visible(spec["seg_lens"], spec["seg_parents"])
    trained = sorted(
        (tuple(ids[kv] for kv in np.flatnonzero(visible[j - 1])), ids[j])
        for j in range(len(ids)) if labels[j] != IGNORE
    )
    expected = sorted(
        (tuple(tokens[:k]), tokens[k]) for tokens, start in samples for k in range(start, len(tokens))
    )
    assert trained == expected


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_packed_weights_follow_the_rule(normalization: str) -> None:
    """Weight 0 exactly where untrained; per-sample sums and the row's units as the rule says."""
    rng = np.random.default_rng(1)
    chats = [chat_samples(rng, 3), chat_samples(rng, 2), chat_samples(rng, 1)]
    message = [[1, 0, 0.5], [0, 0], [2]]
    row = pack(chats, ["a", "b", "c"], message, normalization)
    validate_batch(table_of([row]), "mem", 0)
    weights, labels = np.array(row["loss_weights"]), np.array(row["labels"])
    assert ((weights == 0) == (labels == IGNORE)).all()
    (a0, _, a2), _, (c0,) = [[len(t) - s for t, s in chat] for chat in chats]  # trained tokens
    expected = {
        "token": (1 * a0 + 0.5 * a2 + 2 * c0, a0 + a2 + c0),
        "turn": (1 + 0.5 + 2, 3),  # a trained sample's weights sum to its message weight
        "conversation": ((1 * a0 + 0.5 * a2) / (a0 + a2) + 2, 2),
    }[normalization]
    assert weights.sum() == pytest.approx(expected[0])
    assert row["loss_units"] == expected[1]
