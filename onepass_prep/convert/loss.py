"""What each trained token weighs in the loss, so that one row's weighted sum, divided by
the step's summed units, is the N-pass loss under the chosen normalization (docs/FORMAT.md,
"Loss"). A message's own weight is multiplied in; a sample of weight 0 is not trained.

- token: every trained token of every sample counts once; the denominator counts tokens.
- turn: each N-pass sample's token mean counts once; the denominator counts samples.
- conversation: each conversation's token mean counts once; the denominator counts
  conversations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Normalization = Literal["token", "turn", "conversation"]


def token_weights(
    weights: Sequence[float], trained_tokens: Sequence[int], normalization: Normalization
) -> tuple[list[float], int]:
    """(the loss weight of each trained token of each sample, the conversation's units),
    for samples given by their message weight and their number of trained tokens."""
    trained = [w > 0 and n > 0 for w, n in zip(weights, trained_tokens, strict=True)]
    if normalization == "token":
        return list(weights), sum(n for n, t in zip(trained_tokens, trained, strict=True) if t)
    if normalization == "turn":
        per_token = [w / n if t else 0.0 for w, n, t in zip(weights, trained_tokens, trained, strict=True)]
        return per_token, sum(trained)
    total = sum(n for n, t in zip(trained_tokens, trained, strict=True) if t)
    return [w / total if t else 0.0 for w, t in zip(weights, trained, strict=True)], int(any(trained))
