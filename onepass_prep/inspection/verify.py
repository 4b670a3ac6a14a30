"""`onepass-prep verify`: re-render every N-pass sample from the input and check the rows
against the exactness contract of docs/FORMAT.md, in time linear in the tokens (trained
pairs are compared by the hashed keys of `pairs.py`).

Samples are rendered here with `apply_chat_template(..., tokenize=True)`, independently of
the converter's rendering, tokenizing and layout code. The contract then reads: the keys
of labelled row tokens are the keys of trained sample tokens, and each key's loss weights
summed over the rows equal its samples' loss weights summed, worked out here from the
docs/FORMAT.md table (not by the converter's code). Summing makes a pair trained once per
sample and a pair that conversations sharing a tree train once (docs/FORMAT.md, "Shared
prefixes") the same objective, as they are.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onepass_prep.convert.records import BadRecord, Conversation, Rejection, parse_line
from onepass_prep.convert.render import Renderer, template_error, with_null_fallback
from onepass_prep.convert.sources import Source, SourceError, open_inputs
from onepass_prep.format import FormatError, loss_settings
from onepass_prep.inspection.pairs import Powers, row_keys, sample_keys
from onepass_prep.inspection.runs import Run, iter_rows, load_run_tokenizer

MAX_REPORTED = 10


@dataclass
class Expected:
    """Where each expected key comes from, for reports."""

    conversation: Conversation
    message: int  # index of the assistant message in the messages
    turn: int  # 1-based among the conversation's trained assistant messages
    ids: np.ndarray
    start: int
    weight: float = 1.0  # the loss weight of each trained token (docs/FORMAT.md, "Loss")


@dataclass
class VerifyReport:
    conversations: int = 0
    rejected_skipped: int = 0
    samples: int = 0
    pairs: int = 0
    rows: int = 0
    labelled: int = 0
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0
    model_check: str | None = None
    partial: bool = False  # one shard of several: only its conversations are checked

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def problem(self, text: str, show: bool = True) -> None:
        self.problem_count += 1
        if show and len(self.problems) < MAX_REPORTED:
            self.problems.append(text)


def render_samples(
    tokenizer, messages: list[dict], tools, kwargs: dict
) -> list[tuple[int, np.ndarray, int]]:
    """(message index, ids, first trained position) per assistant message, per FORMAT.md."""
    samples = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            full = tokenizer.apply_chat_template(
                messages[: index + 1], tools=tools, tokenize=True, return_dict=False, **kwargs
            )
            prompt = tokenizer.apply_chat_template(
                messages[:index], tools=tools, tokenize=True, add_generation_prompt=True,
                return_dict=False, **kwargs,
            )
        except Exception as error:  # a template may raise anything
            raise template_error(error) from None
        full, prompt = np.asarray(full, np.int64), np.asarray(prompt, np.int64)
        n = min(len(full), len(prompt))
        differ = np.flatnonzero(full[:n] != prompt[:n])
        samples.append((index, full, max(1, int(differ[0]) if differ.size else n)))
    return samples


def verify(run: Run, inputs: list[Path], model: str | None, model_check: bool) -> VerifyReport:
    """Check the run's rows (or one shard's) against the samples of the input."""
    loaded, same = load_run_tokenizer(run, model)
    if not same:
        raise FormatError(
            f"tokenizer {loaded.name!r} (hash {loaded.hash[:12]}…) is not the one the run was "
            f"converted with (hash {str(run.manifest['tokenizer'].get('hash'))[:12]}…); "
            "verify needs the same tokenizer files and chat template"
        )
    report, powers = VerifyReport(partial=not run.whole), Powers()
    seen = _read_rows(run, powers, report)
    expected = _expected(run, inputs, loaded.tokenizer, report, None if run.whole else set(seen.ids))
    expected_keys = [sample_keys(e.ids, e.start, powers) for e in expected]
    report.samples = len(expected)
    report.pairs = sum(len(k) for k in expected_keys)
    _check_bookkeeping(expected, seen, report, loss_settings(run.manifest)["normalization"])
    _check_pairs(run, expected, expected_keys, seen, loaded.tokenizer.decode, report)
    if model_check:
        from onepass_prep.inspection.model_check import check_losses, run_config

        if report.ok:
            config = run_config(run, model)
            report.model_check = check_losses(run, expected, expected_keys, powers, report, config)
        else:
            report.model_check = "skipped: the rows do not match the samples"
    return report


@dataclass
class SeenRows:
    ids: Counter  # conversation ids over the rows
    keys: np.ndarray  # one key per labelled token
    weights: np.ndarray  # its loss weight
    places: np.ndarray  # (row number, token index) per key
    n_pass_tokens: int
    units: list[tuple[list[str], int]]  # (conversation ids, loss_units) per row


def _read_rows(run: Run, powers: Powers, report: VerifyReport) -> SeenRows:
    ids: Counter = Counter()
    keys_parts, weights, places, n_pass_tokens, units = [], [], [], 0, []
    for row in iter_rows(run):
        report.rows += 1
        ids.update(row.conversation_ids)
        n_pass_tokens += row.n_pass_tokens
        units.append((row.conversation_ids, row.loss_units))
        found, labelled = row_keys(row, powers)
        keys_parts.append(found)
        weights.append(row.loss_weights[labelled].astype(np.float64))
        places.append(np.stack([np.full(len(labelled), row.number), labelled], axis=1))
    report.labelled = sum(len(k) for k in keys_parts)
    flat_weights = np.concatenate([np.zeros(0), *weights])
    return SeenRows(ids, _stack(keys_parts, 4), flat_weights, _stack(places, 2), n_pass_tokens, units)


def _check_bookkeeping(
    expected: list[Expected], seen: SeenRows, report: VerifyReport, normalization: str
) -> None:
    """Each expected conversation in exactly one row, n_pass_tokens as rendered, and each
    row's loss_units what its conversations' trained samples make (docs/FORMAT.md)."""
    wanted = Counter(e.conversation.id for e in expected if e.turn == 1)
    for conversation_id in sorted(set(wanted) | set(seen.ids)):
        if seen.ids[conversation_id] != wanted[conversation_id]:
            report.problem(
                f"conversation {conversation_id}: in {seen.ids[conversation_id]} rows, "
                f"expected {wanted[conversation_id]}"
            )
    rendered = sum(len(e.ids) for e in expected)
    if seen.n_pass_tokens != rendered:
        report.problem(
            f"n_pass_tokens: the rows say {seen.n_pass_tokens:,}, the re-rendered samples have {rendered:,}"
        )
    units: Counter = Counter()
    for e in expected:
        units[e.conversation.id] += {"token": len(e.ids) - e.start, "turn": 1, "conversation": e.turn == 1}[
            normalization
        ]
    for conversation_ids, row_units in seen.units:
        if row_units != sum(units[i] for i in conversation_ids):
            report.problem(
                f"row of {', '.join(conversation_ids)}: loss_units {row_units}, "
                f"expected {sum(units[i] for i in conversation_ids)}"
            )


WEIGHT_TOLERANCE = 1e-5  # relative: float32 weights, summed in another order


def _check_pairs(run, expected, expected_keys, seen: SeenRows, decode, report) -> None:
    """The exactness contract: report keys trained on one side only, or with other summed
    weights, the first of each."""
    sample_places = _stack(
        [
            np.stack([np.full(len(k), i), e.start + np.arange(len(k))], axis=1)
            for i, (k, e) in enumerate(zip(expected_keys, expected, strict=True))
        ],
        2,
    )
    sample_weights = np.concatenate(
        [np.zeros(0)] + [np.full(len(k), np.float32(e.weight), np.float64) for k, e in zip(expected_keys, expected, strict=True)]
    )
    missing, extra = weight_difference(_stack(expected_keys, 4), sample_weights, seen.keys, seen.weights)
    share = MAX_REPORTED // 2 if len(missing) and len(extra) else MAX_REPORTED
    for shown, (sample, k) in enumerate(sorted(sample_places[missing].tolist())):
        e = expected[sample]
        report.problem(
            f"conversation {e.conversation.id} ({e.conversation.source}:{e.conversation.line}), "
            f"turn {e.turn} (message {e.message}), sample token {k} {decode([int(e.ids[k])])!r}: "
            f"not trained with exactly its context and loss weight {e.weight:.6g} in any row",
            show=shown < share,
        )
    for shown, index in enumerate(sorted(extra.tolist(), key=lambda i: seen.places[i].tolist())):
        number, j = seen.places[index].tolist()
        report.problem(
            f"{_row_place(run, number)}, token {j} {decode([int(seen.keys[index, 3])])!r}: "
            "labelled, but no N-pass sample trains this token with this context and loss weight "
            f"{seen.weights[index]:.6g}",
            show=shown < share,
        )


def _expected(
    run: Run, inputs: list[Path], tokenizer, report: VerifyReport, only: set[str] | None
) -> list[Expected]:
    """The N-pass samples of every input conversation the run did not reject (of those
    with an id in `only`, when only some shards are read)."""
    options = run.manifest.get("options", {})
    think_tags = tuple(options.get("think_tags") or ("<think>", "</think>"))
    loss = loss_settings(run.manifest)
    renderer = Renderer(tokenizer, think_tags, options.get("chat_template_kwargs"))
    rejected = Counter((entry.get("id"), entry.get("line")) for entry in run.rejected())
    read = unreadable = 0
    expected = []
    for source in _sources(inputs):
        for number, raw in source.records():
            record = parse_line(raw, source.name, number, think_tags, loss["train_on"])
            if record is None:
                continue
            read += 1
            if isinstance(record, Rejection):
                unreadable += 1
                continue
            if only is not None and record.id not in only:
                continue
            if rejected[(record.id, record.line)] > 0:
                rejected[(record.id, record.line)] -= 1
                report.rejected_skipped += 1
                continue
            report.conversations += 1
            try:
                messages, _, kwargs = renderer.template_input(record)
                samples = with_null_fallback(
                    lambda m: render_samples(tokenizer, m, record.tools, kwargs), messages  # noqa: B023
                )
            except BadRecord as error:
                report.problem(
                    f"conversation {record.id} ({record.source}:{record.line}): {error} "
                    "but the run did not reject it"
                )
                continue
            trained = [
                (message, ids, start) for message, ids, start in samples
                if record.weights[message] > 0 and len(ids) > start
            ]
            expected += _weighted(record, trained, loss["normalization"])
    counts = run.manifest.get("counts", {})
    if only is not None:  # the run-wide counts cover shards not read
        return expected
    if counts.get("read") != read:
        report.problem(f"the input holds {read} records, the run read {counts.get('read')}")
    if counts.get("rejected") != unreadable + report.rejected_skipped:
        report.problem(
            f"{unreadable} unreadable and {report.rejected_skipped} rejected conversations "
            f"match rejected.jsonl, the run rejected {counts.get('rejected')}"
        )
    return expected


def _weighted(
    record: Conversation, samples: list[tuple[int, np.ndarray, int]], normalization: str
) -> list[Expected]:
    """The trained samples, each with its tokens' loss weight by the docs/FORMAT.md table."""
    tokens = sum(len(ids) - start for _, ids, start in samples)
    out = []
    for turn, (message, ids, start) in enumerate(samples, start=1):
        weight = record.weights[message]
        if normalization == "turn":
            weight /= len(ids) - start
        elif normalization == "conversation":
            weight /= tokens
        out.append(Expected(record, message, turn, ids, start, weight))
    return out


def _stack(parts: list[np.ndarray], width: int) -> np.ndarray:
    return np.concatenate([np.zeros((0, width), np.int64), *parts]).astype(np.int64)


def weight_difference(
    left: np.ndarray, left_weights: np.ndarray, right: np.ndarray, right_weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the rows of `left` and of `right` whose key's summed weight differs from
    the other side's (absent = 0), one index per such key and side; found by sorting both
    together: O(n log n), no per-row Python work unless unmatched."""
    both = np.concatenate([left, right])
    if not len(both):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, first, group = np.unique(both, axis=0, return_index=True, return_inverse=True)
    group = group.reshape(-1)
    totals = [np.bincount(group[: len(left)], left_weights, len(first)),
              np.bincount(group[len(left) :], right_weights, len(first))]
    differ = np.abs(totals[0] - totals[1]) > WEIGHT_TOLERANCE * np.maximum(totals[0], totals[1])
    in_right = np.zeros(len(first), bool)
    in_right[group[len(left) :]] = True
    first_right = np.full(len(first), -1)
    first_right[group[len(left) :][::-1]] = np.arange(len(right))[::-1]
    left_side = np.flatnonzero(differ & ~in_right)  # reported at a sample token
    right_side = np.flatnonzero(differ & in_right)  # reported at a row token
    return first[left_side].astype(np.int64), first_right[right_side].astype(np.int64)


def _row_place(run: Run, number: int) -> str:
    offset = 0
    for file, rows, _ in run.shards:
        if number - run.first_row < offset + rows:
            return f"row {number} ({file}: row {number - run.first_row - offset})"
        offset += rows
    return f"row {number}"


def _sources(inputs: list[Path]) -> list[Source]:
    """The inputs as `convert` reads them (any kind, named alike)."""
    try:
        return open_inputs(inputs)
    except SourceError as error:
        raise FormatError(str(error)) from None
