"""Padding rows into a batch whose attention structure is one O(L) integer per token."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from onepass_prep.format import IGNORE_INDEX, token_subtree_end

from .loss import UNITS_KEY, WEIGHTS_KEY

STRUCTURE_KEY = "subtree_end"


@dataclass(frozen=True)
class OnePassCollator:
    """Rows -> ``input_ids``, ``labels``, ``position_ids``, ``subtree_end``, all ``[B, L]`` int64,
    ``loss_weights`` ``[B, L]`` float32 and ``loss_units`` ``[B]`` int64.

    ``subtree_end[b, kv]`` is the last token index that may attend to token ``kv``: token ``q``
    sees ``kv`` iff ``kv <= q <= subtree_end[b, kv]`` (see ``masks.py``). ``L`` is the longest
    row rounded up to ``pad_to_multiple_of`` (128 = FlexAttention's block size). Padding tokens
    carry label -100, position 0, weight 0, and see only themselves, so no softmax row is empty.
    A row without ``loss_weights``/``loss_units`` (read from format v1 by another tool) gets
    what v1 means: weight 1 per trained token, its trained tokens as units.
    """

    pad_to_multiple_of: int = 128
    pad_token_id: int = 0

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(row["input_ids"]) for row in rows)
        length = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, np.ndarray] = {
            "input_ids": np.full((len(rows), length), self.pad_token_id, np.int64),
            "labels": np.full((len(rows), length), IGNORE_INDEX, np.int64),
            "position_ids": np.zeros((len(rows), length), np.int64),
            STRUCTURE_KEY: np.broadcast_to(np.arange(length), (len(rows), length)).copy(),
            WEIGHTS_KEY: np.zeros((len(rows), length), np.float32),
            UNITS_KEY: np.zeros(len(rows), np.int64),
        }
        for b, row in enumerate(rows):
            if "mask_spec" not in row:
                raise KeyError(
                    "row has no 'mask_spec': with transformers.Trainer or TRL SFTTrainer set "
                    "remove_unused_columns=False, or the trainer drops it before collation"
                )
            n = len(row["input_ids"])
            seg_lens = np.asarray(row["mask_spec"]["seg_lens"])
            if seg_lens.sum() != n:
                raise ValueError(f"batch row {b}: sum(seg_lens) != len(input_ids)")
            for name in ("input_ids", "labels", "position_ids"):
                batch[name][b, :n] = row[name]
            batch[WEIGHTS_KEY][b, :n], batch[UNITS_KEY][b] = _loss_columns(row, batch["labels"][b, :n])
            seg_parents = np.asarray(row["mask_spec"]["seg_parents"])
            batch[STRUCTURE_KEY][b, :n] = token_subtree_end(seg_lens, seg_parents)
        return {name: torch.from_numpy(array) for name, array in batch.items()}


def _loss_columns(row: Mapping[str, Any], labels: np.ndarray) -> tuple[np.ndarray, int]:
    has = (WEIGHTS_KEY in row, UNITS_KEY in row)
    if has == (False, False):
        trained = labels != IGNORE_INDEX
        return trained.astype(np.float32), int(trained.sum())
    if has != (True, True):
        raise KeyError(f"a row has only one of '{WEIGHTS_KEY}' and '{UNITS_KEY}'")
    weights = np.asarray(row[WEIGHTS_KEY], np.float32)
    if len(weights) != len(labels):
        raise ValueError(f"len({WEIGHTS_KEY}) != len(input_ids)")
    return weights, int(row[UNITS_KEY])
