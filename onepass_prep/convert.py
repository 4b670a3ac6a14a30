"""The conversion pipeline: JSONL -> canonical chats -> N-pass samples -> prefix tree ->
rows -> packed rows -> Parquet shards. Each step lives in its own module; this one only
wires them together and keeps the counts."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onepass_prep import FORMAT_VERSION, __version__
from onepass_prep.pack import pack
from onepass_prep.records import BadRecord, Conversation, Rejection, parse_line
from onepass_prep.render import Renderer
from onepass_prep.shards import MANIFEST, REJECTED, ShardWriter, write_manifest
from onepass_prep.tokenizer import load_tokenizer
from onepass_prep.tree import Layout, layout_samples

PACK_WINDOW = 1000  # conversations per best-fit-decreasing window


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
    overwrite: bool = False


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


def layout_conversation(conversation: Conversation, renderer: Renderer, max_seq_len: int) -> Layout:
    samples = renderer.samples(conversation)
    if not any(sample.num_trained for sample in samples):
        raise BadRecord("nothing-to-train", "no assistant turn has a token to train")
    layout = layout_samples(samples)
    if len(layout) > max_seq_len:
        raise BadRecord(
            "too-long", f"{len(layout)} one-pass tokens exceed --max-seq-len {max_seq_len}"
        )
    return layout


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to mix a new run into a folder that holds anything, unless told to."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = [
        path
        for path in out_dir.iterdir()
        if path.name.startswith(("part-", MANIFEST, REJECTED)) and path.is_file()
    ]
    others = [path for path in out_dir.iterdir() if path not in ours]
    if others or (ours and not overwrite):
        hint = "" if others else " (pass --overwrite to replace it)"
        raise ConvertError(f"output folder {out_dir} is not empty{hint}")
    for path in ours:
        path.unlink()


def _records(
    inputs: list[Path], think_tags: tuple[str, str], progress: Callable[[int], None]
) -> Iterator[Conversation | Rejection]:
    for path in inputs:
        with open(path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                progress(len(raw))
                record = parse_line(raw, str(path), line_number, think_tags)
                if record is not None:
                    yield record


def convert(
    inputs: list[Path],
    out_dir: Path,
    options: ConvertOptions,
    progress: Callable[[int], None] = lambda _bytes: None,
) -> ConvertSummary:
    """Convert `inputs` into `out_dir`; `progress` is called with each line's byte count."""
    for path in inputs:
        if not path.is_file():
            raise ConvertError(f"input file {path} does not exist")
    loaded = load_tokenizer(options.model, options.chat_template)
    renderer = Renderer(loaded.tokenizer, options.think_tags)
    prepare_out_dir(out_dir, options.overwrite)
    summary = ConvertSummary(max_seq_len=options.max_seq_len)
    writer = ShardWriter(out_dir, options.rows_per_shard)

    with open(out_dir / REJECTED, "w", encoding="utf-8") as rejected:

        def layouts() -> Iterator[tuple[str, Layout]]:
            for record in _records(inputs, options.think_tags, progress):
                summary.read += 1
                if isinstance(record, Conversation):
                    try:
                        layout = layout_conversation(record, renderer, options.max_seq_len)
                    except BadRecord as error:
                        record = Rejection(
                            record.source, record.line, record.id, error.kind, str(error),
                            json.dumps({"id": record.id}),
                        )
                    else:
                        summary.written += 1
                        yield record.id, layout
                        continue
                summary.rejected += 1
                summary.rejected_by_kind[record.kind] += 1
                rejected.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")

        for row in pack(layouts(), options.max_seq_len, PACK_WINDOW, options.pack):
            writer.write(row)
            summary.rows += 1
            summary.one_pass_tokens += len(row)
            summary.n_pass_tokens += row.n_pass_tokens
            summary.trained_tokens += int((row.labels != -100).sum())
    shards = writer.close()
    summary.shards = len(shards)
    write_manifest(out_dir, _manifest(loaded, options, inputs, shards, summary))
    return summary


def _manifest(loaded, options, inputs, shards, summary: ConvertSummary) -> dict:
    option_values = asdict(options)
    option_values["chat_template"] = str(options.chat_template) if options.chat_template else None
    option_values["think_tags"] = list(options.think_tags)
    return {
        "format": "onepass-prep",
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "tokenizer": {
            "name": loaded.name,
            "hash": loaded.hash,
            "chat_template": loaded.tokenizer.chat_template,
        },
        "options": option_values,
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
