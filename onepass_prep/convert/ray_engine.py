"""`convert --engine ray`: the same chunks as the local engine (work.py), converted by a
pool of Ray actors, each holding one tokenizer, that render, lay out, pack and write the
chunk's shard themselves. Results come back in input order, so the driver writes
`rejected.jsonl`, the progress file and the manifest exactly as the local engine does:
the output does not depend on the engine or the number of workers.

Ray Core actors rather than Ray Data: the chunks must be the input's own (a fixed number
of records each) for the bytes to match, and a bounded queue of them keeps the driver's
memory flat. An actor that dies is restarted and its chunk retried; a chunk written twice
leaves the same file.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from onepass_prep.convert.render import Renderer
from onepass_prep.convert.tokenizer import load_tokenizer
from onepass_prep.convert.work import Chunk, ChunkResult, Rules, finish_chunk, ordered_results


class ChunkConverter:
    """One worker: loads the tokenizer once, then converts chunk after chunk."""

    def __init__(self, model: str, chat_template: str | None, template_kwargs: dict, rules: Rules,
                 out_dir: str, packed: bool) -> None:
        loaded = load_tokenizer(model, chat_template)
        self.renderer = Renderer(loaded.tokenizer, rules.think_tags, template_kwargs)
        self.model, self.rules, self.out_dir, self.packed = model, rules, Path(out_dir), packed

    def convert(self, chunk: Chunk) -> ChunkResult:
        # the local engine's one-process pipeline: render a batch while the last one tokenizes
        work = ordered_results(iter(chunk.batches), self.renderer, self.model, self.rules, 1)
        results = [result for _, found in work for result in found]
        return finish_chunk(chunk, results, self.out_dir, self.rules, self.packed)


def ray_chunk_results(
    chunks: Iterator[Chunk], renderer: Renderer, model: str, rules: Rules, out_dir: Path, packed: bool,
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
        pool = [
            actor.remote(model, renderer.tokenizer.chat_template, renderer.template_kwargs, rules,
                         str(out_dir.resolve()), packed)
            for _ in range(workers)
        ]
        pending: deque = deque()
        for number, chunk in enumerate(chunks):
            pending.append(pool[number % workers].convert.remote(chunk))
            if len(pending) >= 2 * workers:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())
    finally:
        if started:
            ray.shutdown()
