"""The conversion pipeline: JSONL -> canonical chats -> N-pass samples -> prefix tree ->
trees shared by conversations with a common prefix -> packed rows -> Parquet shards. Each
step lives in its own module; this one only wires them together and keeps the counts."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onepass_prep import __version__
from onepass_prep.convert.checkpoint import Checkpoint, RunError
from onepass_prep.convert.ray_engine import ray_chunk_results
from onepass_prep.convert.render import Renderer
from onepass_prep.convert.shards import write_manifest
from onepass_prep.convert.sources import Inputs, Source, SourceError, open_inputs
from onepass_prep.convert.storage import Location, StorageError, locate
from onepass_prep.convert.tokenizer import LoadedTokenizer, load_tokenizer
from onepass_prep.convert.work import Rules, chunk_results, finish_chunk, read_chunks
from onepass_prep.format import FORMAT_NAME, FORMAT_VERSION, NORMALIZATIONS, REJECTED, TRAIN_ON


class ConvertError(Exception):
    """A problem with the run as a whole (not with one record)."""


@dataclass
class ConvertOptions:
    model: str = "qwen"
    chat_template: Path | None = None
    think_tags: tuple[str, str] = ("<think>", "</think>")
    chat_template_kwargs: dict = field(default_factory=dict)
    max_seq_len: int = 32768
    train_on: str = "all"  # or "last"
    loss_normalization: str = "token"  # or "turn", "conversation" (docs/FORMAT.md, "Loss")
    pack: bool = True
    share_prefixes: bool = True  # conversations that share a prefix share a tree (docs/FORMAT.md)
    records_per_shard: int = 4096  # input records per chunk: the unit of packing and of shards
    num_proc: int = 1  # worker processes, or Ray workers with engine "ray"
    engine: str = "local"  # or "ray" (docs/scaling.md)
    ray_address: str | None = None  # a running Ray cluster to join; a local one is started otherwise
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
    unshared_tokens: int = 0  # one-pass tokens had each conversation kept a tree of its own
    n_pass_tokens: int = 0
    trained_tokens: int = 0
    reasoning_turns: int = 0  # trained turns given reasoning
    reasoning_dropped: int = 0  # of those, turns the template trains without it
    tool_call_turns: int = 0  # trained turns given tool calls
    tool_calls_dropped: int = 0  # of those, turns whose trained text lacks one of them
    max_seq_len: int = 0
    notes: list[str] = field(default_factory=list)  # things the user should hear of
    render_engine: str = ""  # what rendered the chat template (Renderer.engine_name); not in the manifest

    @property
    def token_saving(self) -> float:
        """Fraction of N-pass tokens the one-pass rows do not spend."""
        return 1 - self.one_pass_tokens / self.n_pass_tokens if self.n_pass_tokens else 0.0

    @property
    def sharing_saving(self) -> float:
        """Fraction of the one-pass layout's tokens that sharing prefixes saves on top."""
        return 1 - self.one_pass_tokens / self.unshared_tokens if self.unshared_tokens else 0.0

    @property
    def fill_rate(self) -> float:
        capacity = self.rows * self.max_seq_len
        return self.one_pass_tokens / capacity if capacity else 0.0


class StrictError(ConvertError):
    """--strict met a record it could not convert."""


def _fingerprint(options: ConvertOptions, inputs: list[Source], tokenizer_hash: str) -> dict:
    """What must not change between an interrupted run and its resumption: the inputs by
    what they point to and what they hold, the options, the tokenizer."""
    return {
        "options": _output_options(options),
        "inputs": [
            [[f.key() for f in i.files] or i.name, i.kind, i.file_bytes, i.fingerprint()] for i in inputs
        ],
        "tokenizer": tokenizer_hash,
        "tool_version": __version__,
        "format_version": FORMAT_VERSION,  # shards of an earlier format are not resumed into a later one
    }


def convert(
    inputs: Inputs,
    out_dir: Path | str,
    options: ConvertOptions,
    progress: Callable[[int, int | None], None] = lambda _bytes, _total: None,
) -> ConvertSummary:
    """Convert `inputs` (paths or URLs of any kind docs/input.md lists, or Python data: an
    iterable of dicts, a `datasets.Dataset`) into `out_dir` (a folder or a URL);
    `progress` hears of the bytes of the records done and of their total where it is
    known (plain JSONL)."""
    if options.train_on not in TRAIN_ON:
        raise ConvertError(f"train_on {options.train_on!r} is not one of {', '.join(TRAIN_ON)}")
    if options.loss_normalization not in NORMALIZATIONS:
        raise ConvertError(
            f"loss_normalization {options.loss_normalization!r} is not one of {', '.join(NORMALIZATIONS)}"
        )
    try:
        files = open_inputs(inputs)
        out = locate(out_dir)
    except (SourceError, StorageError) as error:
        raise ConvertError(str(error)) from None
    if options.resume and (once := next((f for f in files if not f.resumable), None)):
        raise ConvertError(
            f"input {once.name}: cannot be read a second time (standard input and Python data are "
            "read once), so a run on it cannot be resumed"
        )
    template = options.chat_template.read_text(encoding="utf-8") if options.chat_template else None
    try:
        loaded = load_tokenizer(options.model, template)
    except (OSError, ValueError) as error:
        raise ConvertError(str(error)) from None
    renderer = Renderer(loaded.tokenizer, options.think_tags, options.chat_template_kwargs)
    try:
        run = Checkpoint.start(out, _fingerprint(options, files, loaded.hash), options.overwrite, options.resume)
    except (RunError, StorageError, SourceError) as error:
        raise ConvertError(str(error)) from None
    try:
        return _convert(files, out, options, progress, loaded, renderer, run)
    except (SourceError, StorageError) as error:  # an input that broke while read, a store that failed
        raise ConvertError(str(error)) from None
    finally:
        run.release()


def _convert(
    files: list[Source],
    out_dir: Location,
    options: ConvertOptions,
    progress: Callable[[int, int | None], None],
    loaded: LoadedTokenizer,
    renderer: Renderer,
    run: Checkpoint,
) -> ConvertSummary:
    summary = ConvertSummary(max_seq_len=options.max_seq_len, notes=[*run.notes], render_engine=renderer.engine_name)
    if renderer.fallback_reason:
        summary.notes.append(f"chat template rendered by apply_chat_template, not the fast path: {renderer.fallback_reason}")
    _restore_counts(summary, run.done.counts)
    run.begin()
    rules = Rules(
        options.think_tags, options.max_seq_len, options.train_on,
        options.loss_normalization,  # type: ignore[arg-type]  # checked in convert()
        options.share_prefixes,
    )
    where = {file.name: str(file.files[0]) if len(file.files) == 1 else file.name for file in files}
    sizes = [file.size for file in files]
    total = None if None in sizes else sum(size for size in sizes if size is not None)

    def skipped(size: int) -> None:
        progress(size, total)

    if options.engine == "ray":
        results = ray_chunk_results(
            files, options.records_per_shard, run.done.chunks, skipped, renderer, options.model, rules, out_dir,
            options.pack, options.num_proc, options.ray_address,
        )
    else:
        chunks = read_chunks(files, options.records_per_shard, run.done.chunks, skipped)
        results = (
            finish_chunk(chunk, found, out_dir, rules, options.pack)
            for chunk, found in chunk_results(chunks, renderer, options.model, rules, options.num_proc)
        )
    rejected, rejected_bytes = out_dir / REJECTED, run.done.rejected_bytes
    for done in results:
        if options.strict and done.rejections:
            bad = done.rejections[0]
            raise StrictError(f"{where[bad.source]}:{bad.line}: {bad.reason}")
        lines = b"".join(
            (json.dumps(rejection.to_json(), ensure_ascii=False) + "\n").encode() for rejection in done.rejections
        )
        if lines:
            rejected.append(lines)
            rejected_bytes += len(lines)
        _add_counts(summary, done.counts)
        run.save(done.shard, rejected_bytes, _counts(summary))
        progress(done.size, total)
    summary.shards = len(run.done.shards)
    reasoning_field = renderer.reasoning_field(options.chat_template_kwargs)
    run.drop_leftovers()
    rejected.seal()
    write_manifest(out_dir, _manifest(loaded, reasoning_field, options, files, run.done.shards, summary))
    run.finish()
    return summary


COUNTED = (
    "read", "written", "rejected", "rows", "one_pass_tokens", "unshared_tokens", "n_pass_tokens",
    "trained_tokens", "reasoning_turns", "reasoning_dropped", "tool_call_turns", "tool_calls_dropped",
)


def _counts(summary: ConvertSummary) -> dict:
    counts = {name: getattr(summary, name) for name in COUNTED}
    counts["rejected_by_kind"] = dict(summary.rejected_by_kind)
    return counts


def _restore_counts(summary: ConvertSummary, counts: dict) -> None:
    for name in COUNTED:
        setattr(summary, name, counts.get(name, 0))
    summary.rejected_by_kind.update(counts.get("rejected_by_kind", {}))


def _add_counts(summary: ConvertSummary, counts: dict) -> None:
    for name in COUNTED:
        setattr(summary, name, getattr(summary, name) + counts[name])
    summary.rejected_by_kind.update(counts["rejected_by_kind"])


# Options that say how the work is done, not what it produces: left out of the manifest
# (its bytes are the same whatever they are) and free to change on --resume.
HOW = ("overwrite", "resume", "num_proc", "strict", "engine", "ray_address")


def _output_options(options: ConvertOptions) -> dict:
    values = {name: value for name, value in asdict(options).items() if name not in HOW}
    values["chat_template"] = str(options.chat_template) if options.chat_template else None
    values["think_tags"] = list(options.think_tags)
    return values


def _manifest(
    loaded: LoadedTokenizer, reasoning_field: str | None, options: ConvertOptions,
    inputs: list[Source], shards: list[dict], summary: ConvertSummary,
) -> dict:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "tokenizer": {
            "name": loaded.name,
            "hash": loaded.hash,
            "chat_template": loaded.tokenizer.chat_template,
            "reasoning_field": reasoning_field,
        },
        "options": _output_options(options),
        "inputs": [
            {"name": file.name, "kind": file.kind, "bytes": file.file_bytes, "sha256": file.sha256()}
            for file in inputs
        ],
        "shards": shards,
        "counts": {
            "read": summary.read,
            "written": summary.written,
            "rejected": summary.rejected,
            "rejected_by_kind": dict(sorted(summary.rejected_by_kind.items())),
        },
        "tokens": {
            "one_pass": summary.one_pass_tokens,
            "unshared": summary.unshared_tokens,
            "n_pass": summary.n_pass_tokens,
            "trained": summary.trained_tokens,
        },
        "rows": summary.rows,
        "fill_rate": round(summary.fill_rate, 6),
        "loss": {"normalization": options.loss_normalization, "train_on": options.train_on},
        "reasoning_audit": {
            "turns_with_reasoning": summary.reasoning_turns,
            "reasoning_dropped": summary.reasoning_dropped,
        },
        "tool_call_audit": {
            "turns_with_tool_calls": summary.tool_call_turns,
            "tool_calls_dropped": summary.tool_calls_dropped,
        },
    }
