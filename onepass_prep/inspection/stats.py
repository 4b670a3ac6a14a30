"""`onepass-prep stats`: what a run holds and what one pass saves, from its shards and
manifest alone.

Attention work counts visible (query, key) pairs. One pass: every token sees its tree
depth + 1 tokens, so a row costs sum(position_ids + 1). N passes: a sample of L tokens
costs L(L+1)/2, summed in the row's `n_pass_pairs` (format v4). Rows of earlier runs do
not record it; see `n_pass_pairs` for what is derived there and what is not.

The loss: the manifest's normalization and train-on setting, each trained turn's message
weight (read back from `loss_weights` by undoing the normalization, `roles.run_weights`),
and the rows' `loss_units` and `loss_weights` summed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text

from onepass_prep.format import IGNORE_INDEX, loss_settings
from onepass_prep.inspection.roles import run_weights, weight_text
from onepass_prep.inspection.runs import Run, ShardRow, iter_rows

HISTOGRAM_BINS = 10
WEIGHTS_LISTED = 10  # distinct message weights listed, the most common first
UNIT_NAMES = {"token": "trained tokens", "turn": "trained turns", "conversation": "conversations"}


@dataclass
class Stats:
    shards: int = 0
    rows: int = 0
    conversations: int = 0
    trained_runs: int = 0
    tokens_one_pass: int = 0
    tokens_unshared: int = 0  # one-pass, had each conversation kept a tree of its own
    tokens_n_pass: int = 0
    tokens_trained: int = 0
    pairs_one_pass: int = 0
    pairs_n_pass: int = 0
    rows_without_pairs: int = 0  # rows of an earlier format whose N-pass pairs are not known
    lengths: list[int] = field(default_factory=list)
    max_seq_len: int | None = None
    run_counts: dict = field(default_factory=dict)  # the manifest's, for the whole run
    reasoning_audit: dict = field(default_factory=dict)  # the manifest's, for the whole run
    tool_call_audit: dict = field(default_factory=dict)  # the manifest's, for the whole run
    loss: dict = field(default_factory=dict)  # the manifest's normalization and train_on
    loss_units: int = 0
    loss_weight_sum: float = 0.0
    turn_weights: Counter = field(default_factory=Counter)  # message weight -> trained turns

    @property
    def turns_by_weight(self) -> dict[str, int]:
        """Trained turns of weight 1, below 1 (down-weighted) and above 1 (up-weighted)."""
        return {
            "weight_1": self.turn_weights[1.0],
            "below_1": sum(n for w, n in self.turn_weights.items() if w < 1),
            "above_1": sum(n for w, n in self.turn_weights.items() if w > 1),
        }

    @property
    def n_pass_pairs(self) -> int | None:
        """The N-pass attention pairs, None when a row does not give its own: a sum that
        leaves rows out is not shown as the run's."""
        return None if self.rows_without_pairs else self.pairs_n_pass

    @property
    def mean_weight_per_unit(self) -> float | None:
        """The loss weights' sum over the units: 1 when every trained turn weighs 1."""
        return self.loss_weight_sum / self.loss_units if self.loss_units else None

    @property
    def fill_rate(self) -> float | None:
        if not self.max_seq_len or not self.rows:
            return None
        return self.tokens_one_pass / (self.rows * self.max_seq_len)

    @property
    def padding_tokens(self) -> int | None:
        """Tokens a trainer would add by padding every row to max_seq_len (rows store none)."""
        if not self.max_seq_len:
            return None
        return self.rows * self.max_seq_len - self.tokens_one_pass


def compute_stats(run: Run) -> Stats:
    stats = Stats(
        shards=len(run.shards),
        run_counts=run.manifest.get("counts", {}),
        reasoning_audit=run.manifest.get("reasoning_audit", {}),
        tool_call_audit=run.manifest.get("tool_call_audit", {}),
        loss=dict(loss_settings(run.manifest)),
    )
    stats.max_seq_len = run.manifest.get("options", {}).get("max_seq_len")
    # The manifest's shard entries say what sharing saved (v2 runs shared nothing).
    entries = {entry.get("file"): entry for entry in run.manifest.get("shards", []) if isinstance(entry, dict)}
    stats.tokens_unshared = sum(int(entries.get(file.name, {}).get("unshared", tokens)) for file, _, tokens in run.shards)
    for row in iter_rows(run):
        stats.rows += 1
        stats.conversations += len(row.conversation_ids)
        stats.lengths.append(len(row))
        stats.tokens_one_pass += len(row)
        stats.tokens_n_pass += row.n_pass_tokens
        stats.tokens_trained += int((row.labels != IGNORE_INDEX).sum())
        stats.pairs_one_pass += int(row.position_ids.sum(dtype=np.int64)) + len(row)
        stats.trained_runs += len(row.trained_runs)
        pairs = n_pass_pairs(row)
        if pairs is None:
            stats.rows_without_pairs += 1
        else:
            stats.pairs_n_pass += pairs
        stats.turn_weights.update(run_weights(row, stats.loss["normalization"]).tolist())
        stats.loss_units += row.loss_units
        stats.loss_weight_sum += float(row.loss_weights.sum(dtype=np.float64))
    return stats


def n_pass_pairs(row: ShardRow) -> int | None:
    """The attention pairs of the row's N-pass samples: recorded (v4), else derived where
    the row determines them. A sample's trained tokens run to its end, so at least one
    sample ends at each trained run, at depth L - 1. Their lengths add up to
    `n_pass_tokens` only where exactly one does and no sample ends elsewhere (a tree of one
    conversation); then their pairs are the samples'. Else None: where conversations share
    a tree, a chat that is the start of another ends inside the other's path, and nothing
    there says how many samples end at a run."""
    if row.n_pass_pairs is not None:
        return row.n_pass_pairs
    lengths = row.position_ids[[end - 1 for _, end in row.trained_runs]].astype(np.int64) + 1
    if int(lengths.sum()) != row.n_pass_tokens:
        return None
    return int((lengths * (lengths + 1) // 2).sum())


def histogram(lengths: list[int], bins: int = HISTOGRAM_BINS) -> list[tuple[int, int, int]]:
    """(first, last, rows) per bin of row length, inclusive bounds."""
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    edges = np.unique(np.linspace(low, high + 1, bins + 1).astype(np.int64))
    counts, _ = np.histogram(lengths, bins=edges)
    return [(int(a), int(b) - 1, int(n)) for a, b, n in zip(edges, edges[1:], counts, strict=False)]


def _saving(one_pass: int, n_pass: int) -> float:
    return 1 - one_pass / n_pass if n_pass else 0.0


def stats_json(stats: Stats) -> dict:
    lengths = np.asarray(stats.lengths or [0])
    return {
        "shards": stats.shards,
        "rows": stats.rows,
        "conversations": stats.conversations,
        "trained_runs": stats.trained_runs,
        "row_length": {
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "mean": float(lengths.mean()),
            "max": int(lengths.max()),
            "histogram": [
                {"from": a, "to": b, "rows": n} for a, b, n in histogram(stats.lengths)
            ],
        },
        "tokens": {
            "one_pass": stats.tokens_one_pass,
            "unshared": stats.tokens_unshared,
            "n_pass": stats.tokens_n_pass,
            "trained": stats.tokens_trained,
            "saving": _saving(stats.tokens_one_pass, stats.tokens_n_pass),
            "saving_by_layout": _saving(stats.tokens_unshared, stats.tokens_n_pass),
            "saving_by_sharing": _saving(stats.tokens_one_pass, stats.tokens_unshared),
        },
        "attention_pairs": {
            "one_pass": stats.pairs_one_pass,
            "n_pass": stats.n_pass_pairs,
            "saving": None if stats.n_pass_pairs is None else _saving(stats.pairs_one_pass, stats.n_pass_pairs),
            "rows_without_n_pass": stats.rows_without_pairs,
        },
        "packing": {
            "max_seq_len": stats.max_seq_len,
            "fill_rate": stats.fill_rate,
            "padding_tokens": stats.padding_tokens,
        },
        "run": {
            key: stats.run_counts.get(key)
            for key in ("read", "written", "rejected", "rejected_by_kind")
        },
        "reasoning_audit": stats.reasoning_audit,
        "tool_call_audit": stats.tool_call_audit,
        "loss": {
            "normalization": stats.loss.get("normalization"),
            "train_on": stats.loss.get("train_on"),
            "trained_turns": stats.turns_by_weight,
            "turn_weight": _weight_range(stats.turn_weights),
            "turn_weights": [
                {"weight": weight, "turns": turns} for weight, turns in _common(stats.turn_weights)
            ],
            "distinct_turn_weights": len(stats.turn_weights),
            "units": stats.loss_units,
            "weight_sum": stats.loss_weight_sum,
            "mean_weight_per_unit": stats.mean_weight_per_unit,
        },
    }


def _common(weights: Counter) -> list[tuple[float, int]]:
    """The WEIGHTS_LISTED most common message weights, most common (then heaviest) first."""
    return sorted(weights.items(), key=lambda item: (-item[1], -item[0]))[:WEIGHTS_LISTED]


def _weight_range(weights: Counter) -> dict | None:
    if not weights:
        return None
    turns = sum(weights.values())
    mean = sum(weight * count for weight, count in weights.items()) / turns
    return {"min": min(weights), "max": max(weights), "mean": mean}


def stats_view(stats: Stats, width: int) -> Group:
    table = Table(show_header=False, title="onepass-prep stats")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(justify="right")
    table.add_row("shards / rows", f"{stats.shards:,} / {stats.rows:,}", "")
    table.add_row("conversations", f"{stats.conversations:,}", "")
    table.add_row("turns (trained runs)", f"{stats.trained_runs:,}", "")
    table.add_row("", "one-pass", "N-pass")
    table.add_row("tokens", f"{stats.tokens_one_pass:,}", f"{stats.tokens_n_pass:,}")
    pairs = stats.n_pass_pairs
    table.add_row("attention pairs", f"{stats.pairs_one_pass:,}", "?" if pairs is None else f"{pairs:,}")
    table.add_row(
        "saving",
        f"{_saving(stats.tokens_one_pass, stats.tokens_n_pass):.1%} tokens",
        "" if pairs is None else f"{_saving(stats.pairs_one_pass, pairs):.1%} pairs",
    )
    table.add_row("  by the one-pass layout", f"{_saving(stats.tokens_unshared, stats.tokens_n_pass):.1%} tokens", "")
    table.add_row(
        "  by sharing prefixes",
        f"{_saving(stats.tokens_one_pass, stats.tokens_unshared):.1%} tokens",
        f"of {stats.tokens_unshared:,}",
    )
    table.add_row("trained tokens", f"{stats.tokens_trained:,}", "")
    if stats.fill_rate is not None:
        table.add_row("fill rate", f"{stats.fill_rate:.1%} of {stats.max_seq_len:,}", "")
        table.add_row("padding to max_seq_len", f"{stats.padding_tokens:,} tokens", "")
    counts = stats.run_counts
    table.add_row("run: read / written", f"{counts.get('read', 0):,} / {counts.get('written', 0):,}", "")
    table.add_row("run: rejected", f"{counts.get('rejected', 0):,}", "")
    for kind, count in sorted((counts.get("rejected_by_kind") or {}).items()):
        table.add_row(f"  {kind}", f"{count:,}", "")
    audit = stats.reasoning_audit
    if audit:
        dropped, turns = audit.get("reasoning_dropped", 0), audit.get("turns_with_reasoning", 0)
        table.add_row("reasoning dropped", f"{dropped:,} of {turns:,} turns", "")
    calls = stats.tool_call_audit
    if calls:
        dropped, turns = calls.get("tool_calls_dropped", 0), calls.get("turns_with_tool_calls", 0)
        table.add_row("tool calls dropped", f"{dropped:,} of {turns:,} turns", "")
    _loss_rows(table, stats)
    if pairs is None:
        table.caption = (
            f"?: {stats.rows_without_pairs:,} rows, written by an earlier format, do not determine "
            "their N-pass samples' attention pairs; convert again to count them (see docs/inspect.md)"
        )
    return Group(table, _histogram_text(stats.lengths, width))


def _loss_rows(table: Table, stats: Stats) -> None:
    normalization = stats.loss.get("normalization", "token")
    table.add_row("loss: normalization / train on", f"{normalization} / {stats.loss.get('train_on')}", "")
    by_weight = stats.turns_by_weight
    table.add_row("trained turns of weight 1", f"{by_weight['weight_1']:,}", "")
    table.add_row("  weight < 1 (down)", f"{by_weight['below_1']:,}", "")
    table.add_row("  weight > 1 (up)", f"{by_weight['above_1']:,}", "")
    common = _common(stats.turn_weights)
    if common and (len(common) > 1 or common[0][0] != 1):
        shown = ", ".join(f"{weight_text(weight)} ×{turns:,}" for weight, turns in common[:3])
        more = len(stats.turn_weights) - min(3, len(common))
        table.add_row("turn weights", shown + (f", {more:,} more" if more else ""), "")
    table.add_row(f"loss units ({UNIT_NAMES.get(normalization, '?')})", f"{stats.loss_units:,}", "")
    if stats.mean_weight_per_unit is not None:
        table.add_row("mean weight per unit", f"{stats.mean_weight_per_unit:.4g}", "")


def _histogram_text(lengths: list[int], width: int) -> Text:
    bins = histogram(lengths)
    out = Text("row length (tokens)       rows\n", style="bold")
    top = max((n for _, _, n in bins), default=1) or 1
    room = max(10, width - 34)
    for first, last, count in bins:
        out.append(f"{first:>8,}–{last:<8,} {count:>7,} ")
        out.append("█" * round(room * count / top) + "\n", style="cyan")
    return out
