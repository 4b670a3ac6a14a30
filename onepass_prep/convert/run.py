"""The conversion pipeline: JSONL -> canonical chats -> N-pass samples -> prefix tree ->
rows -> packed rows -> Parquet shards. Each step lives in its own module; this one only
wires them together and keeps the counts."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onepass_prep import __version__
from onepass_prep.convert.checkpoint import Checkpoint, RunError
from onepass_prep.convert.ray_engine import ray_chunk_results
from onepass_prep.convert.render import Renderer
from onepass_prep.convert.shards import write_manifest
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
    n_pass_tokens: int = 0
    trained_tokens: int = 0
    reasoning_turns: int = 0  # trained turns given reasoning
    reasoning_dropped: int = 0  # of those, turns the template trains without it
    max_seq_len: int = 0
    notes: list[str] = field(default_factory=list)  # things the user should hear of

    @property
    def token_saving(self) -> float:
        """Fraction of N-pass tokens the one-pass rows do not spend."""
        return 1 - self.one_pass_tokens / self.n_pass_tokens if self.n_pass_tokens else 0.0

    @property
    def fill_rate(self) -> float:
        capacity = self.rows * self.max_seq_len
        return self.one_pass_tokens / capacity if capacity else 0.0


class StrictError(ConvertError):
    """--strict met a record it could not convert."""


@dataclass
class Input:
    """An input file: where it is, what it is called in the output (its path relative to
    the folder all inputs share, so output bytes do not depend on how a path was typed),
    and its content hash (what --resume checks)."""

    path: Path
    name: str
    bytes: int
    sha256: str


# The first bytes of files that are plainly not JSON Lines, and what they are.
NOT_JSONL = {b"\x1f\x8b": "gzip-compressed data", b"\x28\xb5\x2f\xfd": "zstd-compressed data",
             b"PAR1": "a Parquet file", b"PK\x03\x04": "a zip archive"}


def _inputs(paths: list[Path]) -> list[Input]:
    for path in paths:
        if not path.exists():
            raise ConvertError(f"input {path}: no such file")
        if path.is_dir():
            raise ConvertError(f"input {path}: is a directory, not a JSONL file")
        if not path.is_file():
            raise ConvertError(f"input {path}: not a regular file (a pipe or device); save it to a file first")
        _check_looks_like_jsonl(path)
    resolved = [path.resolve() for path in paths]
    if len(set(resolved)) != len(resolved):
        raise ConvertError("an input file is given twice")
    base = Path(os.path.commonpath([path.parent for path in resolved]))
    return [
        Input(path, str(path.relative_to(base)), path.stat().st_size, _sha256(path)) for path in resolved
    ]


def _check_looks_like_jsonl(path: Path) -> None:
    with open(path, "rb") as handle:
        head = handle.read(4096)
    for magic, what in NOT_JSONL.items():
        if head.startswith(magic):
            raise ConvertError(f"input {path}: looks like {what}, not JSON Lines (one JSON object per line)")
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"["):
        raise ConvertError(
            f"input {path}: looks like a JSON array, not JSON Lines (one JSON object per line)"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fingerprint(options: ConvertOptions, inputs: list[Input], tokenizer_hash: str) -> dict:
    """What must not change between an interrupted run and its resumption: the inputs by
    what they point to and what they hold, the options, the tokenizer."""
    return {
        "options": _output_options(options),
        "inputs": [[str(i.path), i.bytes, i.sha256] for i in inputs],
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
    if options.train_on not in TRAIN_ON:
        raise ConvertError(f"train_on {options.train_on!r} is not one of {', '.join(TRAIN_ON)}")
    if options.loss_normalization not in NORMALIZATIONS:
        raise ConvertError(
            f"loss_normalization {options.loss_normalization!r} is not one of {', '.join(NORMALIZATIONS)}"
        )
    files = _inputs(inputs)
    template = options.chat_template.read_text(encoding="utf-8") if options.chat_template else None
    try:
        loaded = load_tokenizer(options.model, template)
    except (OSError, ValueError) as error:
        raise ConvertError(str(error)) from None
    renderer = Renderer(loaded.tokenizer, options.think_tags, options.chat_template_kwargs)
    try:
        run = Checkpoint.start(
            out_dir, _fingerprint(options, files, loaded.hash), options.overwrite, options.resume
        )
    except RunError as error:
        raise ConvertError(str(error)) from None
    try:
        return _convert(files, out_dir, options, progress, loaded, renderer, run)
    finally:
        run.release()


def _convert(
    files: list[Input],
    out_dir: Path,
    options: ConvertOptions,
    progress: Callable[[int], None],
    loaded: LoadedTokenizer,
    renderer: Renderer,
    run: Checkpoint,
) -> ConvertSummary:
    summary = ConvertSummary(max_seq_len=options.max_seq_len, notes=run.notes)
    _restore_counts(summary, run.done.counts)
    run.begin()
    rules = Rules(
        options.think_tags, options.max_seq_len, options.train_on,
        options.loss_normalization,  # type: ignore[arg-type]  # checked in convert()
    )
    sources = [(file.path, file.name) for file in files]
    chunks = read_chunks(sources, options.records_per_shard, run.done.chunks, progress)
    paths = {file.name: file.path for file in files}
    if options.engine == "ray":
        results = ray_chunk_results(
            chunks, renderer, options.model, rules, out_dir, options.pack, options.num_proc, options.ray_address
        )
    else:
        results = (
            finish_chunk(chunk, found, out_dir, options.max_seq_len, options.pack)
            for chunk, found in chunk_results(chunks, renderer, options.model, rules, options.num_proc)
        )
    with open(out_dir / REJECTED, "ab") as rejected:
        for done in results:
            if options.strict and done.rejections:
                bad = done.rejections[0]
                raise StrictError(f"{paths[bad.source]}:{bad.line}: {bad.reason}")
            for rejection in done.rejections:
                rejected.write((json.dumps(rejection.to_json(), ensure_ascii=False) + "\n").encode())
            rejected.flush()
            _add_counts(summary, done.counts)
            run.save(done.shard, rejected.tell(), _counts(summary))
            progress(done.size)
    summary.shards = len(run.done.shards)
    reasoning_field = renderer.reasoning_field(options.chat_template_kwargs)
    write_manifest(out_dir, _manifest(loaded, reasoning_field, options, files, run.done.shards, summary))
    run.finish()
    return summary


COUNTED = (
    "read", "written", "rejected", "rows", "one_pass_tokens", "n_pass_tokens", "trained_tokens",
    "reasoning_turns", "reasoning_dropped",
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
    inputs: list[Input], shards: list[dict], summary: ConvertSummary,
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
        "input_base": str(Path(os.path.commonpath([file.path.parent for file in inputs]))),
        "inputs": [{"name": file.name, "bytes": file.bytes, "sha256": file.sha256} for file in inputs],
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
        "loss": {"normalization": options.loss_normalization, "train_on": options.train_on},
        "reasoning_audit": {
            "turns_with_reasoning": summary.reasoning_turns,
            "reasoning_dropped": summary.reasoning_dropped,
        },
    }
