"""The unit of work of a conversion: a batch of JSONL lines in, one result per line out
(a laid-out conversation or a rejection), and the scheduling of batches on this process
or on worker processes, always handing results back in input order."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

from onepass_prep.convert.loss import Normalization
from onepass_prep.convert.pack import pack
from onepass_prep.convert.records import BadRecord, Conversation, Rejection, parse_line
from onepass_prep.convert.render import Rendered, Renderer, Sample
from onepass_prep.convert.shards import write_shard
from onepass_prep.convert.share import shared_trees
from onepass_prep.convert.sources import Source
from onepass_prep.convert.storage import Location
from onepass_prep.convert.tokenizer import load_tokenizer
from onepass_prep.convert.tree import Layout, layout_samples

BATCH_LINES = 64  # lines per unit of work
BATCH_BYTES = 1 << 20


@dataclass
class Converted:
    id: str
    layout: Layout
    source: str
    line: int
    reasoning_turns: int  # trained turns that were given reasoning
    reasoning_dropped: int  # of those, turns whose trained tokens lack it (the template drops it)
    tool_call_turns: int  # trained turns that were given tool calls
    tool_calls_dropped: int  # of those, turns whose trained text lacks one of them


Line = tuple[str, int, bytes]  # (source file, line number, raw bytes)


@dataclass(frozen=True)
class Rules:
    """How a line becomes a laid-out conversation, besides the template."""

    think_tags: tuple[str, str] = ("<think>", "</think>")
    max_seq_len: int = 32768
    train_on: str = "all"  # or "last": only each conversation's final assistant message
    normalization: Normalization = "token"
    share_prefixes: bool = True  # conversations of a chunk that share a prefix share a tree


def layout_conversation(conversation: Conversation, renderer: Renderer, rules: Rules) -> Layout:
    return _checked_layout(renderer.samples(conversation), rules)


def _checked_layout(samples: list[Sample], rules: Rules) -> Layout:
    if not any(sample.is_trained for sample in samples):
        raise BadRecord("nothing-to-train", "no assistant turn has a token to train")
    layout = layout_samples(samples, rules.normalization)
    if len(layout) > rules.max_seq_len:
        raise BadRecord(
            "too-long", f"{len(layout)} one-pass tokens exceed --max-seq-len {rules.max_seq_len}"
        )
    return layout


Parsed = list[tuple[Conversation | Rejection | None, bytes]]


def convert_lines(lines: list[Line], renderer: Renderer, rules: Rules) -> list[Converted | Rejection]:
    """One result per non-blank line, in order: the unit of work of a worker process."""
    return finish_lines(*render_lines(lines, renderer, rules), renderer, rules)


def render_lines(lines: list[Line], renderer: Renderer, rules: Rules) -> tuple[Parsed, list[Rendered]]:
    """The Python half of the work: parse and render. A conversation whose longest
    sample cannot fit `max_seq_len` by a bound on its text is rejected here, before it is
    tokenized (the one-pass layout holds every sample whole)."""
    parsed = [(parse_line(raw, source, number, rules.think_tags, rules.train_on), raw) for source, number, raw in lines]
    conversations = [record for record, _ in parsed if isinstance(record, Conversation)]
    rendered = renderer.render_many(conversations)
    for index, turns in enumerate(rendered):
        if isinstance(turns, list):
            fewest = max((renderer.encoder.fewest_tokens(turn.text) for turn in turns), default=0)
            if fewest > rules.max_seq_len:
                rendered[index] = BadRecord(
                    "too-long", f"at least {fewest} tokens in one sample exceed --max-seq-len {rules.max_seq_len}"
                )
    return parsed, rendered


def finish_lines(parsed: Parsed, rendered: list[Rendered], renderer: Renderer, rules: Rules) -> list[Converted | Rejection]:
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
            layout = _checked_layout(found, rules)
            trained = [sample for sample in found if sample.is_trained]
            reasoning = [sample.reasoning for sample in trained]
            tool_calls = [sample.tool_calls for sample in trained]
            results.append(
                Converted(
                    record.id, layout, record.source, record.line,
                    reasoning_turns=len(reasoning) - reasoning.count("none"),
                    reasoning_dropped=reasoning.count("dropped"),
                    tool_call_turns=len(tool_calls) - tool_calls.count("none"),
                    tool_calls_dropped=tool_calls.count("dropped"),
                )
            )
        except BadRecord as error:
            text = raw.decode("utf-8").rstrip("\r\n")
            results.append(Rejection(record.source, record.line, record.id, error.kind, str(error), text))
    return results


_worker: dict = {}


def _start_worker(model: str, chat_template: str | None, template_kwargs: dict, rules: Rules) -> None:
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    loaded = load_tokenizer(model, chat_template)
    renderer = Renderer(loaded.tokenizer, rules.think_tags, template_kwargs)
    _worker.update(renderer=renderer, rules=rules)


def _exit_with_parent(parent: int) -> None:
    """A worker must not outlive its parent, however the parent ends (kill -9 included):
    once it is gone, the worker is re-parented, and it exits."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _work(lines: list[Line]) -> list[Converted | Rejection]:
    return convert_lines(lines, _worker["renderer"], _worker["rules"])


@dataclass
class Chunk:
    """`records` consecutive input records (lines, blank ones included), in batches: the
    unit of packing and of shard naming, so the output does not depend on how chunks are
    scheduled (one process, worker processes or a Ray cluster)."""

    index: int
    batches: list[list[Line]]

    @property
    def size(self) -> int:
        return sum(len(raw) for batch in self.batches for _, _, raw in batch)


def read_chunks(
    sources: list[Source], records: int, first_chunk: int, skipped: Callable[[int], None]
) -> Iterator[Chunk]:
    """The input, source after source, cut into chunks of `records` records (the last may
    be shorter); chunks before `first_chunk` are read past (their bytes reported to
    `skipped`). Ray workers read the same chunks by plan (plan.py)."""
    lines = ((source.name, number, raw) for source in sources for number, raw in source.records())
    for index in itertools.count():
        chunk = make_chunk(index, itertools.islice(lines, records))
        if chunk is None:
            return
        if index < first_chunk:
            skipped(chunk.size)
        else:
            yield chunk


def make_chunk(index: int, lines: Iterable[Line]) -> Chunk | None:
    """A chunk of these lines, in batches of about a megabyte; None if there are none."""
    batches: list[list[Line]] = []
    batch: list[Line] = []
    size = 0
    for line in lines:
        batch.append(line)
        size += len(line[2])
        if len(batch) >= BATCH_LINES or size >= BATCH_BYTES:
            batches.append(batch)
            batch, size = [], 0
    batches += [batch] * bool(batch)
    return Chunk(index, batches) if batches else None


@dataclass
class ChunkResult:
    """What a chunk adds to the run: its shard (already written), its rejections in input
    order, and its counts (run.py's COUNTED)."""

    index: int
    shard: dict
    rejections: list[Rejection]
    counts: dict
    size: int  # input bytes, for progress


def finish_chunk(
    chunk: Chunk, results: list[Converted | Rejection], out_dir: Location, rules: Rules, packed: bool
) -> ChunkResult:
    """Share prefixes among a chunk's conversations, pack them and write the chunk's shard:
    the same bytes wherever it runs."""
    converted = [result for result in results if isinstance(result, Converted)]
    if rules.share_prefixes:
        trees = shared_trees([(c.id, c.layout) for c in converted], rules.max_seq_len, rules.normalization)
    else:
        trees = [([result.id], result.layout) for result in converted]
    rows = pack(trees, rules.max_seq_len, packed)
    rejections = [result for result in results if isinstance(result, Rejection)]
    counts = {
        "read": len(results), "written": len(converted), "rejected": len(rejections),
        "rejected_by_kind": dict(Counter(rejection.kind for rejection in rejections)),
        "rows": len(rows), "one_pass_tokens": sum(len(row) for row in rows),
        "unshared_tokens": sum(row.unshared_tokens for row in rows),
        "n_pass_tokens": sum(row.n_pass_tokens for row in rows),
        "trained_tokens": sum(row.num_trained for row in rows),
        "reasoning_turns": sum(result.reasoning_turns for result in converted),
        "reasoning_dropped": sum(result.reasoning_dropped for result in converted),
        "tool_call_turns": sum(result.tool_call_turns for result in converted),
        "tool_calls_dropped": sum(result.tool_calls_dropped for result in converted),
    }
    return ChunkResult(chunk.index, write_shard(out_dir, chunk.index, rows), rejections, counts, chunk.size)


def chunk_results(
    chunks: Iterator[Chunk], renderer: Renderer, model: str, rules: Rules, num_proc: int
) -> Iterator[tuple[Chunk, list[Converted | Rejection]]]:
    """Each chunk with the results of its lines, in input order (every chunk has a batch:
    `read_chunks` makes none without a line)."""
    pending: deque[Chunk] = deque()

    def batches() -> Iterator[list[Line]]:
        for chunk in chunks:
            pending.append(chunk)
            yield from chunk.batches

    results: list[Converted | Rejection] = []
    done = 0
    for _, found in ordered_results(batches(), renderer, model, rules, num_proc):
        results += found
        done += 1
        while pending and done == len(pending[0].batches):
            yield pending.popleft(), results
            results, done = [], 0


def ordered_results(
    batches: Iterator[list[Line]],
    renderer: Renderer,
    model: str,
    rules: Rules,
    num_proc: int,
) -> Iterator[tuple[list[Line], list[Converted | Rejection]]]:
    """Each batch with its results, in input order; with workers, a bounded number of
    batches in flight, so memory does not grow with the input."""
    if num_proc == 1:
        # One process, two stages: this thread renders batch k + 1 while a second one
        # tokenizes batch k (the tokenizer releases the GIL), so both cores have work.
        with ThreadPoolExecutor(1) as second:
            previous: tuple[list[Line], Future[list[Converted | Rejection]]] | None = None
            for batch in batches:
                rendered = render_lines(batch, renderer, rules)
                future = second.submit(finish_lines, *rendered, renderer, rules)
                if previous:
                    yield previous[0], previous[1].result()
                previous = (batch, future)
            if previous:
                yield previous[0], previous[1].result()
        return
    # spawn, not fork: the parent has threads (progress display, tokenizer pools).
    context = multiprocessing.get_context("spawn")
    initargs = (model, renderer.tokenizer.chat_template, renderer.template_kwargs, rules)
    pool = ProcessPoolExecutor(num_proc, context, _start_worker, initargs)
    try:
        pending: deque[tuple[list[Line], Future[list[Converted | Rejection]]]] = deque()
        for batch in batches:
            pending.append((batch, pool.submit(_work, batch)))
            if len(pending) >= 4 * num_proc:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:  # on an interruption too: do not wait for work nobody will read
        pool.shutdown(wait=True, cancel_futures=True)
