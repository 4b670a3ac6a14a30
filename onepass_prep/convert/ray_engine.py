"""`convert --engine ray`: the same chunks as the local engine (work.py), converted by a
pool of Ray actors, each holding one tokenizer, that read their chunk's records, render,
lay out, pack and write the chunk's shard themselves. The driver only plans (plan.py):
it sends each worker which records make its chunk and where they lie, never the records
(except for standard input and Python data, which only the driver can read). Results
come back in input order, so the driver writes `rejected.jsonl`, the progress record
and the manifest exactly as the local engine does: the output does not depend on the
engine or the number of workers.

Ray Core actors rather than Ray Data: the chunks must be the input's own (a fixed number
of records each) for the bytes to match, and a bounded queue of them keeps the driver's
memory flat. An actor that dies is restarted and its chunk retried; a chunk written twice
leaves the same file.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from onepass_prep.convert.plan import ChunkPlan, Count, counting_jobs, plan_chunks
from onepass_prep.convert.render import Renderer
from onepass_prep.convert.sources import Source, SourceError, count_lines, open_source
from onepass_prep.convert.storage import Location, StorageError
from onepass_prep.convert.tokenizer import load_tokenizer
from onepass_prep.convert.work import (
    Chunk,
    ChunkResult,
    Rules,
    finish_chunk,
    make_chunk,
    ordered_results,
    read_chunks,
)


class ChunkConverter:
    """One worker: loads the tokenizer once, then reads and converts chunk after chunk.
    `inputs` are the run's sources as (where, name), opened here when first read."""

    def __init__(self, model: str, chat_template: str | None, template_kwargs: dict, rules: Rules,
                 inputs: list[tuple[Location | None, str]], out_dir: Location, packed: bool) -> None:
        loaded = load_tokenizer(model, chat_template)
        self.renderer = Renderer(loaded.tokenizer, rules.think_tags, template_kwargs)
        self.model, self.rules, self.out_dir, self.packed = model, rules, out_dir, packed
        self.inputs = inputs
        self.sources: dict[int, Source] = {}

    def source(self, index: int) -> Source:
        if index not in self.sources:
            where, name = self.inputs[index]
            assert where is not None  # plans name only sources that can be opened again
            self.sources[index] = open_source(where, name)
        return self.sources[index]

    def count(self, job: Count) -> tuple[list[int], bool] | int:
        """A counting job of the plan (plan.py)."""
        source = self.source(job.source)
        if job.length >= 0:
            return count_lines(source.files[0], job.offset, job.length, job.step)
        return sum(1 for _ in source.records())

    def convert(self, work: ChunkPlan | Chunk) -> ChunkResult:
        chunk = self.read(work) if isinstance(work, ChunkPlan) else work
        # the local engine's one-process pipeline: render a batch while the last one tokenizes
        done = ordered_results(iter(chunk.batches), self.renderer, self.model, self.rules, 1)
        results = [result for _, found in done for result in found]
        return finish_chunk(chunk, results, self.out_dir, self.rules, self.packed)

    def read(self, plan: ChunkPlan) -> Chunk:
        lines = (
            (self.source(piece.source).name, number, raw)
            for piece in plan.pieces
            for number, raw in itertools.islice(self.source(piece.source).records(piece.first, at=piece.at), piece.count)
        )
        chunk = make_chunk(plan.index, lines)
        assert chunk is not None  # a plan has no empty chunk
        return chunk


def ray_chunk_results(
    sources: list[Source], records: int, first_chunk: int, skipped: Callable[[int], None],
    renderer: Renderer, model: str, rules: Rules, out_dir: Location, packed: bool,
    workers: int, address: str | None,
) -> Iterator[ChunkResult]:
    """Each chunk's result, in input order, with at most two chunks per worker in flight."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--engine ray needs Ray: pip install 'onepass-prep[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    try:
        actor: Any = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=-1)(ChunkConverter)
        inputs = [(source.origin, source.name) for source in sources]
        pool = [
            actor.remote(model, renderer.tokenizer.chat_template, renderer.template_kwargs, rules, inputs,
                         out_dir, packed)
            for _ in range(workers)
        ]
        work: Iterator[ChunkPlan | Chunk]
        if all(source.origin is not None for source in sources):
            jobs = counting_jobs(sources)
            answers = _get(ray, [pool[number % workers].count.remote(job) for number, job in enumerate(jobs)])
            work = plan_chunks(sources, records, first_chunk, dict(zip(jobs, answers, strict=True)))
        else:  # standard input or Python data: only the driver can read it
            work = read_chunks(sources, records, first_chunk, skipped)
        pending: deque = deque()
        for number, item in enumerate(work):
            pending.append(pool[number % workers].convert.remote(item))
            if len(pending) >= 2 * workers:
                yield _get(ray, pending.popleft())
        while pending:
            yield _get(ray, pending.popleft())
    finally:
        if started:
            ray.shutdown()


def _get(ray: Any, refs: Any) -> Any:
    """`ray.get`, raising a worker's `SourceError` (a corrupt input) or `StorageError`
    (a store that fails) as it is: one line, not a remote traceback."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, SourceError | StorageError):
            raise error.cause from None
        raise
