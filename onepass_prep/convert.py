"""The conversion pipeline: JSONL -> canonical chats -> N-pass samples -> prefix tree ->
rows -> packed rows -> Parquet shards. Each step lives in its own module; this one only
wires them together and keeps the counts."""

from __future__ import annotations

import json
import multiprocessing
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onepass_prep import FORMAT_VERSION, __version__
from onepass_prep.checkpoint import Checkpoint, RunError, SyncPoint
from onepass_prep.pack import pack
from onepass_prep.records import BadRecord, Conversation, Rejection, parse_line
from onepass_prep.render import Rendered, Renderer, Sample
from onepass_prep.shards import REJECTED, ShardWriter, write_manifest
from onepass_prep.tokenizer import load_tokenizer
from onepass_prep.tree import Layout, layout_samples

BATCH_LINES = 64  # lines per unit of work
BATCH_BYTES = 1 << 20


class ConvertError(Exception):
    """A problem with the run as a whole (not with one record)."""


@dataclass
class ConvertOptions:
    model: str = "qwen"
    chat_template: Path | None = None
    think_tags: tuple[str, str] = ("<think>", "</think>")
    max_seq_len: int = 32768
    pack: bool = True
    rows_per_shard: int = 1000
    num_proc: int = 1
    overwrite: bool = False
    resume: bool = False
    strict: bool = False


@dataclass
class ConvertSummary:
    read: int = 0
    written: int = 0
    rejected: int = 0
    rejected_by_kind: Counter = field(default_factory=Counter)
    rows: int = 0
    shards: int = 0
    one_pass_tokens: int = 0
    n_pass_tokens: int = 0
    trained_tokens: int = 0
    max_seq_len: int = 0

    @property
    def token_saving(self) -> float:
        """Fraction of N-pass tokens the one-pass rows do not spend."""
        return 1 - self.one_pass_tokens / self.n_pass_tokens if self.n_pass_tokens else 0.0

    @property
    def fill_rate(self) -> float:
        capacity = self.rows * self.max_seq_len
        return self.one_pass_tokens / capacity if capacity else 0.0


@dataclass
class Converted:
    id: str
    layout: Layout
    source: str
    line: int


Line = tuple[str, int, bytes]  # (source file, line number, raw bytes)


def layout_conversation(conversation: Conversation, renderer: Renderer, max_seq_len: int) -> Layout:
    return _checked_layout(renderer.samples(conversation), max_seq_len)


def _checked_layout(samples: list[Sample], max_seq_len: int) -> Layout:
    if not any(sample.num_trained for sample in samples):
        raise BadRecord("nothing-to-train", "no assistant turn has a token to train")
    layout = layout_samples(samples)
    if len(layout) > max_seq_len:
        raise BadRecord(
            "too-long", f"{len(layout)} one-pass tokens exceed --max-seq-len {max_seq_len}"
        )
    return layout


Parsed = list[tuple[Conversation | Rejection | None, bytes]]


def convert_lines(
    lines: list[Line], renderer: Renderer, think_tags: tuple[str, str], max_seq_len: int
) -> list[Converted | Rejection]:
    """One result per non-blank line, in order: the unit of work of a worker process."""
    return finish_lines(*render_lines(lines, renderer, think_tags), renderer, max_seq_len)


def render_lines(
    lines: list[Line], renderer: Renderer, think_tags: tuple[str, str]
) -> tuple[Parsed, list[Rendered]]:
    """The Python half of the work: parse and render."""
    parsed = [(parse_line(raw, source, number, think_tags), raw) for source, number, raw in lines]
    conversations = [record for record, _ in parsed if isinstance(record, Conversation)]
    return parsed, renderer.render_many(conversations)


def finish_lines(
    parsed: Parsed, rendered: list[Rendered], renderer: Renderer, max_seq_len: int
) -> list[Converted | Rejection]:
    """The other half: tokenize (mostly outside the GIL) and lay out."""
    samples = iter(renderer.tokenize(rendered))
    results: list[Converted | Rejection] = []
    for record, raw in parsed:
        if not isinstance(record, Conversation):
            results += [record] if record else []
            continue
        try:
            found = next(samples)
            if isinstance(found, BadRecord):
                raise found
            layout = _checked_layout(found, max_seq_len)
            results.append(Converted(record.id, layout, record.source, record.line))
        except BadRecord as error:
            text = raw.decode("utf-8").rstrip("\r\n")
            results.append(Rejection(record.source, record.line, record.id, error.kind, str(error), text))
    return results


_worker: dict = {}


def _start_worker(model: str, chat_template: str | None, think_tags: tuple[str, str], max_seq_len: int) -> None:
    loaded = load_tokenizer(model, chat_template)
    _worker.update(renderer=Renderer(loaded.tokenizer, think_tags), think_tags=think_tags, max_seq_len=max_seq_len)


def _work(lines: list[Line]) -> list[Converted | Rejection]:
    return convert_lines(lines, _worker["renderer"], _worker["think_tags"], _worker["max_seq_len"])


def _batches(
    inputs: list[Path], first_file: int, first_line: int, skipped: Callable[[int], None]
) -> Iterator[list[Line]]:
    """Lines in input order from (first_file, first_line), about a megabyte at a time."""
    batch: list[Line] = []
    size = 0
    for index, path in enumerate(inputs[first_file:], start=first_file):
        start = first_line if index == first_file else 1
        with open(path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                if line_number < start:
                    skipped(len(raw))
                    continue
                batch.append((str(path), line_number, raw))
                size += len(raw)
                if len(batch) >= BATCH_LINES or size >= BATCH_BYTES:
                    yield batch
                    batch, size = [], 0
    if batch:
        yield batch


def _ordered_results(
    batches: Iterator[list[Line]], options: ConvertOptions, renderer: Renderer
) -> Iterator[tuple[list[Line], list[Converted | Rejection]]]:
    """Results in input order; with workers, a bounded number of batches in flight."""
    if options.num_proc == 1:
        # One process, two stages: this thread renders batch k + 1 while a second one
        # tokenizes batch k (the tokenizer releases the GIL), so both cores have work.
        with ThreadPoolExecutor(1) as second:
            pending = None
            for batch in batches:
                rendered = render_lines(batch, renderer, options.think_tags)
                future = second.submit(finish_lines, *rendered, renderer, options.max_seq_len)
                if pending:
                    yield pending[0], pending[1].result()
                pending = (batch, future)
            if pending:
                yield pending[0], pending[1].result()
        return
    # spawn, not fork: the parent has threads (progress display, tokenizer pools).
    context = multiprocessing.get_context("spawn")
    initargs = (options.model, renderer.tokenizer.chat_template, options.think_tags, options.max_seq_len)
    pool = ProcessPoolExecutor(options.num_proc, context, _start_worker, initargs)
    try:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.submit(_work, batch)))
            if len(pending) >= 4 * options.num_proc:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:  # on an interruption too: do not wait for work nobody will read
        pool.shutdown(wait=True, cancel_futures=True)


class StrictError(ConvertError):
    """--strict met a record it could not convert."""


def _fingerprint(options: ConvertOptions, inputs: list[Path], tokenizer_hash: str) -> dict:
    """What must not change between an interrupted run and its resumption."""
    values = _option_values(options)
    for free in ("overwrite", "resume", "num_proc", "strict"):
        values.pop(free)
    stats = [path.stat() for path in inputs]
    return {
        "options": values,
        "inputs": [[str(p), st.st_size, st.st_mtime_ns] for p, st in zip(inputs, stats, strict=True)],
        "tokenizer": tokenizer_hash,
        "tool_version": __version__,
    }


def convert(
    inputs: list[Path],
    out_dir: Path,
    options: ConvertOptions,
    progress: Callable[[int], None] = lambda _bytes: None,
) -> ConvertSummary:
    """Convert `inputs` into `out_dir`; `progress` is called with byte counts as lines finish."""
    for path in inputs:
        if not path.is_file():
            raise ConvertError(f"input file {path} does not exist")
    if len({path.resolve() for path in inputs}) != len(inputs):
        raise ConvertError("an input file is given twice")
    template = options.chat_template.read_text(encoding="utf-8") if options.chat_template else None
    loaded = load_tokenizer(options.model, template)
    renderer = Renderer(loaded.tokenizer, options.think_tags)
    try:
        run = Checkpoint.start(
            out_dir, _fingerprint(options, inputs, loaded.hash), options.overwrite, options.resume
        )
    except RunError as error:
        raise ConvertError(str(error)) from None
    summary = ConvertSummary(max_seq_len=options.max_seq_len)
    _restore_counts(summary, run.sync.counts)
    writer = ShardWriter(out_dir, options.rows_per_shard, run.shards, run.save)
    file_index = {str(path): index for index, path in enumerate(inputs)}
    position = (run.sync.file, run.sync.line)

    with open(out_dir / REJECTED, "ab") as rejected:

        def converted() -> Iterator[tuple[str, Layout]]:
            nonlocal position
            batches = _batches(inputs, run.sync.file, run.sync.line, progress)
            for batch, results in _ordered_results(batches, options, renderer):
                progress(sum(len(raw) for _, _, raw in batch))
                for result in results:
                    position = (file_index[result.source], result.line + 1)
                    summary.read += 1
                    if isinstance(result, Converted):
                        summary.written += 1
                        yield result.id, result.layout
                        continue
                    if options.strict:
                        raise StrictError(f"{result.source}:{result.line}: {result.reason}")
                    summary.rejected += 1
                    summary.rejected_by_kind[result.kind] += 1
                    rejected.write((json.dumps(result.to_json(), ensure_ascii=False) + "\n").encode())

        for group in pack(converted(), options.max_seq_len, options.pack):
            for row in group:
                summary.rows += 1
                summary.one_pass_tokens += len(row)
                summary.n_pass_tokens += row.n_pass_tokens
                summary.trained_tokens += int((row.labels != -100).sum())
                if run.skip_rows:
                    run.skip_rows -= 1  # already in a shard the interrupted run completed
                else:
                    writer.write(row)
            rejected.flush()
            run.sync = SyncPoint(*position, summary.rows, rejected.tell(), _counts(summary))
    shards = writer.close()
    summary.shards = len(shards)
    write_manifest(out_dir, _manifest(loaded, options, inputs, shards, summary))
    run.finish()
    return summary


COUNTED = ("read", "written", "rejected", "rows", "one_pass_tokens", "n_pass_tokens", "trained_tokens")


def _counts(summary: ConvertSummary) -> dict:
    counts = {name: getattr(summary, name) for name in COUNTED}
    counts["rejected_by_kind"] = dict(summary.rejected_by_kind)
    return counts


def _restore_counts(summary: ConvertSummary, counts: dict) -> None:
    for name in COUNTED:
        setattr(summary, name, counts.get(name, 0))
    summary.rejected_by_kind.update(counts.get("rejected_by_kind", {}))


def _option_values(options: ConvertOptions) -> dict:
    values = asdict(options)
    values["chat_template"] = str(options.chat_template) if options.chat_template else None
    values["think_tags"] = list(options.think_tags)
    return values


def _manifest(loaded, options, inputs, shards, summary: ConvertSummary) -> dict:
    return {
        "format": "onepass-prep",
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "tokenizer": {
            "name": loaded.name,
            "hash": loaded.hash,
            "chat_template": loaded.tokenizer.chat_template,
        },
        "options": _option_values(options),
        "inputs": [str(path) for path in inputs],
        "shards": shards,
        "counts": {
            "read": summary.read,
            "written": summary.written,
            "rejected": summary.rejected,
            "rejected_by_kind": dict(sorted(summary.rejected_by_kind.items())),
        },
        "tokens": {
            "one_pass": summary.one_pass_tokens,
            "n_pass": summary.n_pass_tokens,
            "trained": summary.trained_tokens,
        },
        "rows": summary.rows,
        "fill_rate": round(summary.fill_rate, 6),
    }
