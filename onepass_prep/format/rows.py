"""The row invariants, checked vectorised per record batch (docs/FORMAT.md): the one
check behind every reader (the torch datasets, inspect, stats, verify).

The mask builders trust these invariants (pre-order segments above all), so a broken row must
stop loading with the file and row named rather than train on a wrong mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from onepass_prep.format.files import IGNORE_INDEX, FormatError
from onepass_prep.format.structure import subtree_last


def list_parts(array: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (from 0) and flat values of a list array (a slice keeps its parent's
    offsets), zero-copy where Arrow allows."""
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy()[offsets[0] : offsets[-1]]
    return offsets - offsets[0], values


def with_loss_columns(table: pa.Table) -> pa.Table:
    """A v1 table with the v2 loss columns it implies (weight 1 per trained token, its
    trained tokens as the row's units); a v2 table as it is. Readers call it on what they
    read, so v1 and v2 rows look the same from then on."""
    if "loss_weights" in table.column_names:
        return table
    labels = table.column("labels").combine_chunks()
    offsets, values = list_parts(labels)
    weights = pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), pa.array((values != IGNORE_INDEX).astype(np.float32))
    )
    return table.append_column("loss_weights", weights).append_column(
        "loss_units", table.column("num_trained_tokens")
    )


def list_columns(batch: pa.RecordBatch | pa.Table) -> dict[str, pa.Array]:
    """The list columns, with ``mask_spec`` unnested (``flatten`` honours slicing)."""
    columns = {}
    names = ["input_ids", "position_ids", "labels", "mask_spec"]
    for name in names + ["loss_weights"] * ("loss_weights" in batch.schema.names):
        column = batch.column(name)
        columns[name] = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    spec = columns.pop("mask_spec")
    return columns | {f.name: array for f, array in zip(spec.type, spec.flatten(), strict=True)}


def validate_batch(batch: pa.RecordBatch | pa.Table, path: Path | str, first_row: int) -> None:
    """Raise FormatError naming ``path`` and a broken row (counted from 0 within the file).

    ``first_row`` is the file row number of the batch's first row."""
    _Checker(batch, path, first_row).run()


class _Checker:
    def __init__(self, batch: pa.RecordBatch | pa.Table, path: Path | str, first_row: int) -> None:
        self.batch, self.path, self.first_row = batch, path, first_row

    def fail_if(self, bad_rows: np.ndarray, what: str) -> None:
        """``bad_rows`` is a boolean per row."""
        if bad_rows.any():
            row = self.first_row + int(np.argmax(bad_rows))
            raise FormatError(f"{self.path}: row {row}: {what}")

    def fail_at_token(self, bad: np.ndarray, tok_off: np.ndarray, what: str) -> None:
        """``bad`` is a boolean per token of the batch; names the first one's row and index."""
        if bad.any():
            token = int(np.argmax(bad))
            row = int(np.searchsorted(tok_off, token, side="right")) - 1
            raise FormatError(f"{self.path}: row {self.first_row + row}: token {token - tok_off[row]}: {what}")

    def column(self, name: str) -> pa.Array | pa.ChunkedArray:
        return self.batch.column(name)  # null counts and numpy views work on either

    def run(self) -> None:
        n = self.batch.num_rows
        lists = list_columns(self.batch)
        optional = [name for name in ("loss_units", "n_pass_pairs") if name in self.batch.schema.names]
        for name in ["num_tokens", "num_trained_tokens", "mask_spec", *optional]:
            self.fail_if(_nulls(self.column(name), n), f"{name} is null")
        for name, array in lists.items():
            self.fail_if(_nulls(array, n), f"{name} is null")
            if array.values.null_count:
                self.fail_if(_inner_nulls(array), f"{name} holds a null")

        parts = {name: list_parts(array) for name, array in lists.items()}
        tok_off, ids = parts["input_ids"]
        length = np.diff(tok_off)
        num_tokens = self.column("num_tokens").to_numpy()
        self.fail_if(length == 0, "empty row")
        self.fail_if(num_tokens != length, "num_tokens differs from len(input_ids)")
        for name in ("position_ids", "labels", "loss_weights"):
            if name in parts:
                self.fail_if(np.diff(parts[name][0]) != length, f"len({name}) != len(input_ids)")
        seg_off, seg_lens = parts["seg_lens"]
        par_off, parents = parts["seg_parents"]
        self.fail_if(np.diff(par_off) != np.diff(seg_off), "len(seg_parents) != len(seg_lens)")
        seg_row = np.repeat(np.arange(n), np.diff(seg_off))
        self.fail_if(_any_per_row(seg_lens < 1, seg_row, n), "a seg_lens entry is < 1")
        seg_sum = np.zeros(n, np.int64)
        np.add.at(seg_sum, seg_row, seg_lens)
        self.fail_if(seg_sum != length, "sum(seg_lens) != len(input_ids)")
        local = np.arange(len(seg_lens)) - seg_off[seg_row]
        bad_parent = (parents < -1) | (parents >= local)
        self.fail_if(_any_per_row(bad_parent, seg_row, n), "seg_parents[s] is not -1 or < s")

        global_parent = np.where(parents >= 0, parents + seg_off[seg_row], -1)
        last, descendants = subtree_last(global_parent)
        not_preorder = last - np.arange(len(last)) != descendants
        self.fail_if(_any_per_row(not_preorder, seg_row, n), "segments not in depth-first pre-order")

        self.check_tokens(parts, seg_lens, global_parent, tok_off, n)
        if "conversation_segments" in self.batch.schema.names:
            self.check_owners(seg_off, n)

    def check_owners(self, seg_off: np.ndarray, n: int) -> None:
        """Each conversation id has its list of segments, each a segment of the row."""
        owners = self.column("conversation_segments")
        owners = owners.combine_chunks() if isinstance(owners, pa.ChunkedArray) else owners
        if owners.null_count:
            return  # written without it (a v2 row in a v3 table): readers derive it
        names = self.column("conversation_ids")
        names = names.combine_chunks() if isinstance(names, pa.ChunkedArray) else names
        counts = np.diff(owners.offsets.to_numpy())
        self.fail_if(counts != np.diff(names.offsets.to_numpy()), "len(conversation_segments) != len(conversation_ids)")
        inner_off, segments = list_parts(owners.flatten())
        segment_row = np.repeat(np.repeat(np.arange(n), counts), np.diff(inner_off))
        bad = (segments < 0) | (segments >= np.diff(seg_off)[segment_row])
        self.fail_if(_any_per_row(bad, segment_row, n), "a conversation_segments entry is not a segment of the row")

    def check_tokens(self, parts: dict, seg_lens: np.ndarray, global_parent: np.ndarray,
                     tok_off: np.ndarray, n: int) -> None:
        ids, positions, labels = (parts[k][1] for k in ("input_ids", "position_ids", "labels"))
        tok_row = np.repeat(np.arange(n), np.diff(tok_off))
        self.fail_at_token(ids < 0, tok_off, "negative token id")
        seg_start = np.cumsum(seg_lens) - seg_lens
        seg_last = seg_start + seg_lens - 1
        parent_token = np.arange(len(ids)) - 1
        parent_token[seg_start] = np.where(global_parent >= 0, seg_last[global_parent], -1)

        has_parent = parent_token >= 0
        depth = np.where(has_parent, positions[np.maximum(parent_token, 0)] + 1, 0)
        self.fail_at_token(positions != depth, tok_off, "position_ids != tree depth")

        trained = labels != IGNORE_INDEX
        previous = np.arange(len(ids)) - 1
        at_row_start = previous + 1 == tok_off[tok_row]
        wrong_value = trained & (labels != ids)
        wrong_parent = trained & (at_row_start | (parent_token != previous))
        self.fail_at_token(wrong_value, tok_off, "label != input_ids at a trained token")
        self.fail_at_token(wrong_parent, tok_off, "trained token whose parent is not the previous token")
        trained_count = np.zeros(n, np.int64)
        np.add.at(trained_count, tok_row, trained)
        self.fail_if(
            trained_count != self.column("num_trained_tokens").to_numpy(),
            "num_trained_tokens differs from the labels",
        )
        if "loss_weights" in parts:
            self.check_loss(parts["loss_weights"][1], trained, trained_count, tok_off)

    def check_loss(self, weights: np.ndarray, trained: np.ndarray, trained_count: np.ndarray,
                   tok_off: np.ndarray) -> None:
        self.fail_at_token(~trained & (weights != 0), tok_off, "loss weight != 0 at an untrained token")
        good = np.isfinite(weights) & (weights > 0)
        self.fail_at_token(trained & ~good, tok_off, "loss weight not > 0 and finite at a trained token")
        units = self.column("loss_units").to_numpy()
        # Conversations that share a tree (v3) share trained tokens, whose weights then sum:
        # their units may pass the row's trained tokens.
        shared = "conversation_segments" in self.batch.schema.names
        self.fail_if((units < 0) | (~shared & (units > trained_count)), "loss_units not in [0, num_trained_tokens]")
        self.fail_if((units == 0) != (trained_count == 0), "loss_units is 0 but tokens are trained, or the reverse")


def _nulls(array: pa.Array, n: int) -> np.ndarray:
    if not array.null_count:
        return np.zeros(n, bool)
    return array.is_null().to_numpy(zero_copy_only=False)


def _inner_nulls(array: pa.ListArray) -> np.ndarray:
    offsets = array.offsets.to_numpy()  # not list_parts: its values would not convert
    flat = array.flatten().is_null().to_numpy(zero_copy_only=False)
    rows = np.repeat(np.arange(len(array)), np.diff(offsets))
    return _any_per_row(flat, rows, len(array))


def _any_per_row(flags: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, bool)
    out[rows[flags]] = True
    return out
