"""Where records come from: every input kind as numbered raw JSON records.

Whatever the input (JSONL, plain or gzip/zstd-compressed; a JSON array; Parquet files or
a folder of them; a `datasets.save_to_disk` folder or an Arrow file; standard input;
Python dicts or a `datasets.Dataset`), a `Source` yields `(number, raw)` pairs: `raw` the
bytes of one JSON record, which `records.parse_line` parses as it parses a JSONL line, so
parsing, rejections (their `raw` text) and everything after are one path for all kinds.

Numbers are 1-based. For JSONL (files and standard input) a record's number is its line
number, and every line is yielded, blank ones too (`parse_line` skips them), so numbers
are the lines an editor shows. For every other kind it is the record's position: the
element of a JSON array, the row of a Parquet file or Arrow table (over all files of a
folder, in reading order; `dataset[number - 1]`), the item of a Python iterable.

Rows of Parquet and Arrow data are read in batches, never as a whole table; JSON arrays
are cut into records by a scanner that holds one record and one read chunk. Memory does
not grow with the input.

Files are read through `storage.Location`, so every kind reads the same from a local path
or a URL (`s3://`, `gs://`, ...). A plain JSONL file can also be read from a byte offset
(`Position`), which is how Ray workers read their own chunk of one (plan.py).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import posixpath
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NamedTuple

from onepass_prep.convert.storage import Location, StorageError, locate

Record = tuple[int, bytes]  # (number, raw JSON of one record)


class Position(NamedTuple):
    """Where reading a plain JSONL file starts: a byte offset and the number of the line
    that holds that byte (a line begun before it is yielded from the offset on, under
    its own number, and skipped by `Source.records` as a record before `start`)."""

    offset: int = 0
    number: int = 1


START = Position()
# Records in order, from number `start` on where the reader can skip cheaply (row groups,
# Arrow batches), else from the first (text must be read to be skipped), or from a
# `Position` (plain JSONL).
Reader = Callable[[int, Position], Iterator[Record]]

# The columns of a Parquet or Arrow row that make a record; other columns are ignored.
COLUMNS = ("id", "messages", "conversations", "tools", "chat_template_kwargs")
ROWS_PER_BATCH = 256
CHUNK = 1 << 20  # bytes read at a time

GZIP, ZSTD, PARQUET = b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"PAR1"
ARROW_FILE, ARROW_STREAM = b"ARROW1", b"\xff\xff\xff\xff"
ZIP = (b"PK\x03\x04", b"PK\x05\x06")
UTF8_BOM = b"\xef\xbb\xbf"
SPLIT_FILE = re.compile(r"(?P<split>[^/]+?)-\d{5}-of-\d{5}\.parquet$")  # the hub's shard names


class SourceError(Exception):
    """An input that cannot be read: one line naming it and saying why."""


class BrokenArray(ValueError):
    """A JSON array whose structure is broken, so that no further record can be found."""


class Source:
    """One input, read as numbered raw JSON records (see the module's docstring).

    `name` is what rejections and the manifest call it; `kind` says what it is (`jsonl`,
    `jsonl.gz`, `jsonl.zst`, `json`, `json.gz`, `json.zst`, `parquet`, `parquet-folder`,
    `arrow`, `save_to_disk`, `stdin`, `python`, `dataset`). `files` are the files read, in
    reading order; `file_bytes` their total size. `resumable` says whether `records` can
    be called again and give the same records (files can; standard input and Python
    iterables cannot); `origin` is where it was opened from, to open it again elsewhere
    (a Ray worker). `size` is the total length of the raw records, known before reading
    only for plain JSONL files (the raw lines are the file), for byte-counted progress.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        reader: Reader,
        files: tuple[Location, ...] = (),
        size: int | None = None,
        count: Callable[[], int | None] = lambda: None,
        origin: Location | None = None,
    ):
        self.name = name
        self.kind = kind
        self.files = files
        self.origin = origin
        self.resumable = bool(files)
        self.file_bytes = sum(file.size() for file in files) if files else None
        self.size = size
        self._reader = reader
        self._count = count
        self._sha256: str | None = None

    def __repr__(self) -> str:
        return f"Source({self.name!r}, {self.kind!r})"

    def records(
        self, start: int = 1, skipped: Callable[[int], None] | None = None, at: Position = START
    ) -> Iterator[Record]:
        """`(number, raw)` for every record numbered `start` or more, in order. Records
        before `start` are skipped as cheaply as the kind allows: Parquet and Arrow skip
        whole files and row groups unread; text is read (from `at`, for plain JSONL), and
        `skipped` (if given) is called with the length of each raw record passed over, so
        that byte-counted progress can start where a resumed run starts. A file that turns
        out corrupt or truncated while it is read raises `SourceError`."""
        number = 0
        try:
            for number, raw in self._reader(start, at):
                if number >= start:
                    yield number, raw
                elif skipped is not None:
                    skipped(len(raw))
        except StorageError as error:
            raise SourceError(f"input {self.name}: {error}") from error
        except _read_errors() as error:
            where = f"after record {number}" if number >= start else f"before record {start}"
            raise SourceError(
                f"input {self.name}: cannot read its {self.kind} data {where}: {_one_line(error)}"
            ) from error

    def sha256(self) -> str | None:
        """sha256 over the bytes of the files read, in reading order, for local files
        (computed on first call); None for an input that cannot be read again, and for
        one in an object store, whose bytes the driver of a Ray run does not read."""
        if not self.resumable or not all(file.is_local for file in self.files):
            return None
        if self._sha256 is None:
            digest = hashlib.sha256()
            for file in self.files:
                with file.open() as handle:
                    while chunk := handle.read(CHUNK):
                        digest.update(chunk)
            self._sha256 = digest.hexdigest()
        return self._sha256

    def fingerprint(self) -> str | None:
        """What `--resume` compares: the sha256 of local files, the store's version of
        each object (its ETag) for an object store's; None if it cannot be read again."""
        if self.sha256() is not None or not self.resumable:
            return self.sha256()
        return ",".join(str(file.version()) for file in self.files)

    def count(self) -> int | None:
        """The number of records, where it is known without reading them: Parquet and
        Arrow (from their metadata), a `datasets.Dataset` and a sized Python collection;
        None otherwise (JSONL counts lines, blank ones too, so it is not known either)."""
        return self._count()


def open_source(path: Location | Path | str, name: str | None = None) -> Source:
    """The source at `path` (a local path or a URL), recognised by what it holds, not by
    its name: `-` is standard input (JSONL); a file is gzip or zstd-compressed (JSONL or a
    JSON array inside), Parquet, Arrow, a JSON array (first non-space byte `[`) or else
    JSONL; a folder is a `datasets.save_to_disk` folder or a folder of Parquet files.
    Anything else is a `SourceError` naming the path and what it looks like."""
    if str(path) == "-":
        return Source(name or "<stdin>", "stdin", lambda _start, _at: _lines(sys.stdin.buffer))
    try:
        location = path if isinstance(path, Location) else locate(path)
        source = _open_source(location, name or str(location))
    except StorageError as error:
        raise SourceError(f"input {error}") from None
    source.origin = location
    return source


def _open_source(path: Location, name: str) -> Source:
    if path.is_dir():
        return _folder(path, name)
    if not path.is_file():
        if path.is_local and os.path.exists(str(path)):
            raise SourceError(f"input {path}: not a regular file (a pipe or device); save it to a file first")
        raise SourceError(f"input {path}: no such file or folder")
    head = _head(path)
    if head.startswith(ZIP):
        raise SourceError(f"input {path}: looks like a zip archive; unpack it and pass the files inside")
    if head.startswith(PARQUET):
        return _parquet(name, "parquet", (path,))
    if head.startswith((ARROW_FILE, ARROW_STREAM)):
        return _arrow(name, "arrow", (path,))
    for magic, suffix in ((GZIP, ".gz"), (ZSTD, ".zst")):
        if head.startswith(magic):
            what = "gzip" if suffix == ".gz" else "zstd"
            try:
                inner = _inner_head(path, suffix)
            except _read_errors() as error:
                raise SourceError(f"input {path}: looks like {what}-compressed data, but cannot be read: {_one_line(error)}") from None
            if inner.startswith((PARQUET, ARROW_FILE, ARROW_STREAM, GZIP, ZSTD, *ZIP)):
                raise SourceError(f"input {path}: {what}-compressed binary data, not JSON; decompress it first")
            kind = _json_kind(inner)
            return Source(name, kind + suffix, _text_reader(path, kind, suffix), (path,))
    kind = _json_kind(head)
    size = path.size() if kind == "jsonl" else None
    return Source(name, kind, _text_reader(path, kind, ""), (path,), size)


def python_source(items: Iterable[Any], name: str = "<python>") -> Source:
    """A source over Python records: any iterable of dicts, each dumped to JSON as it
    comes (a JSONL line's meaning exactly); a `datasets.Dataset`, read in Arrow batches;
    a `datasets.IterableDataset` (`streaming=True`), row by row. Rows of a dataset are
    taken as Parquet rows are (see `arrow_row`). Not resumable."""
    kind = _dataset_kind(items)
    dataset: Any = items
    if kind == "Dataset":
        table = dataset.select_columns(_columns(name, "the dataset", dataset.column_names)).with_format("arrow")

        def batches(start: int, _: Position) -> Iterator[Record]:
            return _numbered_rows(_skip_batches(table.iter(batch_size=ROWS_PER_BATCH), start), start)

        return Source(name, "dataset", batches, count=lambda: len(dataset))

    def rows(_start: int, _at: Position) -> Iterator[Record]:
        for number, item in enumerate(items, start=1):
            yield number, _dump(arrow_row(item) if kind else item)

    count = (lambda: len(dataset)) if hasattr(items, "__len__") else (lambda: None)
    return Source(name, "dataset" if kind else "python", rows, count=count)


def arrow_row(row: dict) -> dict:
    """A Parquet/Arrow row as a record. A struct column gives every message (every tool,
    every argument object) every key any of them has, absent ones as null, so a null in
    a struct cannot be told from an absent key: nulls in objects are dropped (at every
    depth; nulls in lists are kept). Chats mean the same either way (`content` null and
    absent are the same; the template never sees a null key). The keys of an object
    come in the struct's field order (every row's keys, in the order first seen), not
    in each record's own: a template that renders tools with `tojson` shows a tool's
    properties in that order, which may differ from the JSONL the data came from.
    Columns stored as JSON text keep each record's order: `messages`, `conversations`,
    `tools` and `chat_template_kwargs` given as text are read as the list or object
    they hold (columns whose shape varies from row to row are often saved so)."""
    record = _without_nulls(row)
    shapes = {"messages": list, "conversations": list, "tools": list, "chat_template_kwargs": dict}
    for column, shape in shapes.items():
        value = record.get(column)
        if isinstance(value, str):
            try:
                decoded = json.loads(value)
            except ValueError:
                continue  # left as text: parse_line rejects it, saying why
            if isinstance(decoded, shape):
                record[column] = decoded
    return record


# --- text: JSONL and JSON arrays, plain or compressed -------------------------------


def _head(path: Location) -> bytes:
    with path.open(sequential=False) as handle:
        return handle.read(4096)


def _json_kind(head: bytes) -> str:
    return "json" if head.removeprefix(UTF8_BOM).lstrip(b" \t\r\n").startswith(b"[") else "jsonl"


@contextmanager
def _decompressed(path: Location, suffix: str) -> Iterator[IO[bytes]]:
    with path.open() as raw:
        if suffix == ".gz":
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                yield stream  # type: ignore[misc]
            return
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
        with io.BufferedReader(reader, CHUNK) as buffered:  # type: ignore[arg-type]
            yield buffered


def _inner_head(path: Location, suffix: str) -> bytes:
    """The first 4096 bytes of compressed data, decompressed from the few compressed
    blocks they need (the driver of a Ray run reads no more of an input than this)."""
    with path.open(sequential=False) as raw:
        if suffix == ".gz":
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                return stream.read(4096)
        import zstandard

        decompressor = zstandard.ZstdDecompressor()
        with decompressor.stream_reader(raw, read_size=16384, read_across_frames=True, closefd=False) as stream:
            return stream.read(4096)


@contextmanager
def _plain(path: Location, offset: int) -> Iterator[IO[bytes]]:
    with path.open() as stream:
        stream.seek(offset)
        yield stream


def _text_reader(path: Location, kind: str, suffix: str) -> Reader:
    def read(_: int, at: Position) -> Iterator[Record]:
        with _decompressed(path, suffix) if suffix else _plain(path, at.offset) as stream:
            if kind == "json":
                yield from enumerate(_ArrayScanner(stream).elements(), start=1)  # type: ignore[arg-type]
            else:
                yield from _lines(stream, at.number)

    return read


def _lines(stream: Iterable[bytes], first: int = 1) -> Iterator[Record]:
    return enumerate(stream, start=first)


def count_lines(path: Location, offset: int, length: int, step: int) -> tuple[list[int], bool]:
    """The newlines in each `step` bytes of `length` bytes of a plain JSONL file from
    `offset`, and whether the last of those bytes is one: the counting pass that places a
    Ray run's chunks in a file (plan.py), run by the workers on blocks of it, in parallel."""
    counts, last = [], b"\n"
    with _plain(path, offset) as stream:
        while length > 0 and (block := stream.read(min(step, length))):
            counts.append(block.count(b"\n"))
            last, length = block[-1:], length - len(block)
    return counts, last == b"\n"


class _ArrayScanner:
    """Cuts a JSON array into the raw bytes of its elements without parsing them (each
    is parsed once, by `parse_line`, so a malformed element is one rejection, with its
    number). Only brackets and strings are followed, so the buffer holds the element
    being read and one chunk. If the array itself is broken (no `[`, a missing comma,
    an element or string that never ends), `BrokenArray` gives the byte offset."""

    STRUCTURE = re.compile(rb'[\[\]{}"]')
    SCALAR_END = re.compile(rb"[\s,\]]")

    def __init__(self, stream: io.BufferedIOBase):
        self.stream = stream
        self.buf = bytearray()
        self.base = 0  # offset in the stream of buf[0]
        self.pos = 0  # scanning position in buf
        self.mark = 0  # start of the element being read; buf keeps everything from it
        self.eof = False

    def elements(self) -> Iterator[bytes]:
        if self._next_byte(skip_bom=True) != b"[":
            self._broken("does not start with '['")
        self.pos += 1
        if self._next_byte() == b"]":
            return self._end()
        while True:
            yield self._element()
            separator = self._next_byte()
            if separator == b"]":
                return self._end()
            if separator != b",":
                self._broken("expected ',' or ']' after an element")
            self.pos += 1
            if self._next_byte() in (b"]", None):
                self._broken("expected an element after ','")

    def _end(self) -> None:
        self.pos += 1
        if self._next_byte() is not None:
            self._broken("text after the closing ']'")

    def _element(self) -> bytes:
        self.mark = self.pos
        first = self.buf[self.pos : self.pos + 1]
        if first in (b"{", b"["):
            self._skip_nested()
        elif first == b'"':
            self.pos += 1
            self._skip_string()
        else:  # a number, true/false/null or junk: parse_line says which
            while not (found := self.SCALAR_END.search(self.buf, self.pos)) and self._fill():
                pass
            self.pos = found.start() if found else len(self.buf)
        element = bytes(self.buf[self.mark : self.pos])
        self.mark = self.pos
        return element

    def _skip_nested(self) -> None:
        depth = 0
        while True:
            found = self.STRUCTURE.search(self.buf, self.pos)
            if not found:
                self.pos = len(self.buf)
                if not self._fill():
                    self._broken("an element that never ends", self.base + self.mark)
                continue
            self.pos = found.end()
            char = found.group()
            if char == b'"':
                self._skip_string()
            elif char in (b"{", b"["):
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    return

    def _skip_string(self) -> None:
        """From just inside a string to just after its closing quote."""
        opening = self.base + self.pos - 1
        while True:
            quote = self.buf.find(b'"', self.pos)
            if quote < 0:
                self.pos = len(self.buf)
                if not self._fill():
                    self._broken("a string that never ends", opening)
                continue
            backslashes = 0
            while self.buf[quote - 1 - backslashes] == 0x5C:  # the opening quote stops it
                backslashes += 1
            self.pos = quote + 1
            if backslashes % 2 == 0:
                return

    def _next_byte(self, skip_bom: bool = False) -> bytes | None:
        """The next byte that is not whitespace (not consumed), or None at the end."""
        while True:
            if skip_bom and self.base == 0 and self.pos == 0:
                if len(self.buf) < 3 and self._fill():
                    continue
                if self.buf.startswith(UTF8_BOM):
                    self.pos = 3
            while self.pos < len(self.buf) and self.buf[self.pos] in b" \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return bytes(self.buf[self.pos : self.pos + 1])
            self.mark = self.pos
            if not self._fill():
                return None

    def _fill(self) -> bool:
        """Read a chunk, dropping what is before `mark`; False at the end of the stream."""
        if self.eof:
            return False
        chunk = self.stream.read(CHUNK)
        if not chunk:
            self.eof = True
            return False
        shift = self.mark
        del self.buf[:shift]
        self.buf += chunk
        self.base += shift
        self.pos -= shift
        self.mark = 0
        return True

    def _broken(self, what: str, offset: int | None = None) -> None:
        """`offset`: in the stream; where the scanner is if not given."""
        offset = self.base + self.pos if offset is None else offset
        raise BrokenArray(f"not a well-formed JSON array: {what} (byte {offset})")


# --- Parquet and Arrow ------------------------------------------------------------------


def _parquet(name: str, kind: str, files: tuple[Location, ...]) -> Source:
    import pyarrow.parquet as pq

    try:
        schema = parquet_footer(files[0]).schema.to_arrow_schema()
    except _read_errors() as error:
        raise SourceError(f"input {name}: {files[0].name} looks like Parquet, but cannot be read: {_one_line(error)}") from None
    _columns(name, files[0].name, schema.names)

    def read(start: int, _: Position) -> Iterator[Record]:
        offset = 0  # rows before the current file
        for path in files:
            with path.open(sequential=False) as handle, pq.ParquetFile(handle) as parquet:
                rows = parquet.metadata.num_rows
                if offset + rows < start:
                    offset += rows
                    continue
                columns = _columns(name, path.name, parquet.schema_arrow.names)
                groups: list[int] = []  # row groups to read
                first = offset + 1  # number of the first row of the first of them
                for index in range(parquet.num_row_groups):
                    size = parquet.metadata.row_group(index).num_rows
                    if first + size <= start and not groups:
                        first += size
                        continue
                    groups.append(index)
                batches = parquet.iter_batches(ROWS_PER_BATCH, groups, columns) if groups else iter(())
                yield from _numbered_rows(_skip_batches(batches, max(start - first + 1, 1)), max(start, first))
                offset += rows

    def count() -> int:
        return sum(parquet_footer(path).num_rows for path in files)

    return Source(name, kind, read, files, count=count)


def parquet_footer(path: Location) -> Any:
    """A Parquet file's metadata (`pyarrow.parquet.FileMetaData`), fetched alone: its
    last 8 bytes, then the footer they give the length of (a reader asked for the
    metadata fetches the file's last 64 KB, which for a small file is all of it)."""
    import pyarrow.parquet as pq

    with path.open(sequential=False) as handle:
        size = handle.seek(0, io.SEEK_END)
        handle.seek(max(size - 8, 0))
        tail = handle.read(8)
        length = int.from_bytes(tail[:4], "little")
        if len(tail) < 8 or tail[4:] != PARQUET or length > size - 12:
            raise OSError(f"no Parquet footer at the end of its {size} bytes")
        handle.seek(size - 8 - length)
        footer = handle.read(length)
    return pq.read_metadata(io.BytesIO(PARQUET + footer + tail))


def _arrow(name: str, kind: str, files: tuple[Location, ...]) -> Source:
    """Arrow IPC files, stream format (what `datasets` writes) or file format."""
    try:
        with _arrow_batches(files[0]) as (schema, _):
            names = schema.names
    except _read_errors() as error:
        raise SourceError(f"input {name}: {files[0].name} looks like Arrow, but cannot be read: {_one_line(error)}") from None
    _columns(name, files[0].name, names)

    def read(start: int, _: Position) -> Iterator[Record]:
        number = 1  # of the next row
        for path in files:
            with _arrow_batches(path) as (schema, batches):
                columns = _columns(name, path.name, schema.names)
                for batch in batches:
                    if number + batch.num_rows <= start:
                        number += batch.num_rows
                        continue
                    skip = max(start - number, 0)
                    yield from _numbered_rows(iter([batch.select(columns).slice(skip)]), number + skip)
                    number += batch.num_rows

    def count() -> int:
        total = 0
        for path in files:
            with _arrow_batches(path) as (_, batches):
                total += sum(batch.num_rows for batch in batches)
        return total

    return Source(name, kind, read, files, count=count)


@contextmanager
def _arrow_batches(path: Location) -> Iterator[tuple[Any, Iterator[Any]]]:
    """(schema, batches) of an Arrow file, stream format (what `datasets` writes) or file
    format, read a batch at a time."""
    import pyarrow as pa

    with path.open() as handle:
        if handle.read(6) == ARROW_FILE:
            handle.seek(0)
            reader = pa.ipc.open_file(handle)
            yield reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            handle.seek(0)
            stream = pa.ipc.open_stream(handle)
            yield stream.schema, iter(stream)


def _columns(name: str, where: str, names: list[str]) -> list[str]:
    """The columns to read, or a `SourceError` if none holds the chats."""
    if "messages" not in names and "conversations" not in names:
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise SourceError(
            f"input {name}: {where} has no 'messages' or 'conversations' column (its columns: {shown or 'none'})"
        )
    return [column for column in COLUMNS if column in names]


def _skip_batches(batches: Iterator[Any], start: int) -> Iterator[Any]:
    """The batches from row `start` (1-based) on, the first one cut."""
    skip = start - 1
    for batch in batches:
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        yield batch.slice(skip) if skip else batch
        skip = 0


def _numbered_rows(batches: Iterator[Any], first: int) -> Iterator[Record]:
    number = first
    for batch in batches:
        for row in batch.to_pylist(maps_as_pydicts="lossy"):
            yield number, _dump(arrow_row(row))
            number += 1


# --- folders ----------------------------------------------------------------------------


def _folder(path: Location, name: str) -> Source:
    if (path / "dataset_dict.json").is_file():
        splits = sorted(entry for entry in path.children() if (path / entry / "state.json").is_file())
        raise SourceError(
            f"input {path}: a datasets DatasetDict folder (splits: {', '.join(splits)}); "
            f"pass one split's folder, e.g. {path / (splits[0] if splits else 'train')}"
        )
    if (path / "state.json").is_file():
        try:
            state = json.loads((path / "state.json").read_bytes().decode("utf-8"))
            files = tuple(path / entry["filename"] for entry in state["_data_files"])
        except (ValueError, KeyError, TypeError) as error:
            raise SourceError(f"input {path}: a save_to_disk folder whose state.json cannot be read ({error})") from None
        missing = [file.name for file in files if not file.is_file()]
        if missing or not files:
            raise SourceError(f"input {path}: a save_to_disk folder missing its data files ({', '.join(missing) or 'none listed'})")
        return _arrow(name, "save_to_disk", files)
    parquet = tuple(
        path / file for file in sorted(path.files())
        if file.endswith(".parquet") and not any(part.startswith(".") for part in file.split("/"))
    )  # hidden folders (a download cache) left out
    if not parquet:
        what = sorted({os.path.splitext(entry)[1] or entry for entry in path.children()})
        raise SourceError(
            f"input {path}: a folder, but neither a datasets.save_to_disk folder (no state.json) "
            f"nor one with .parquet files (it holds: {', '.join(what) or 'nothing'})"
        )
    splits = sorted({match["split"] for file in parquet if (match := SPLIT_FILE.search(file.name))})
    if len(splits) > 1:
        raise SourceError(
            f"input {path}: holds Parquet files of several splits ({', '.join(splits)}); "
            "pass the files or folder of one"
        )
    return _parquet(name, "parquet-folder", parquet)


# --- Python -----------------------------------------------------------------------------


def _dataset_kind(items: object) -> str | None:
    """The class of a `datasets` dataset (`Dataset` or `IterableDataset`), None for
    anything else; datasets is not imported if nobody has."""
    if "datasets" not in sys.modules:
        return None
    import datasets

    if isinstance(items, datasets.Dataset):
        return "Dataset"
    return "IterableDataset" if isinstance(items, datasets.IterableDataset) else None


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _dump(record: object) -> bytes:
    """One record as JSON bytes. A string with a lone surrogate (possible in Python, not
    in Arrow) is written escaped, so parse_line rejects it as `bad-unicode`; values JSON
    has no type for (bytes, dates) are written as text."""
    try:
        return json.dumps(record, ensure_ascii=False, default=_as_text).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(record, default=_as_text).encode("utf-8")


def _as_text(value: object) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a corrupt or truncated file raises."""
    import zlib

    import pyarrow as pa

    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error, pa.ArrowException, BrokenArray]
    if "zstandard" in sys.modules:
        errors.append(sys.modules["zstandard"].ZstdError)
    return tuple(errors)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


Inputs = str | Path | Sequence[str | Path] | Iterable[dict]


def open_inputs(inputs: Inputs) -> list[Source]:
    """Sources for paths and URLs (files, folders, `-` for standard input, URL patterns
    such as `s3://b/chats/*.jsonl`; each named relative to the folder they share, so
    output bytes do not depend on how a path was typed), or one source for Python data
    (an iterable of dicts, a `datasets.Dataset`)."""
    if isinstance(inputs, str | Path):
        inputs = [inputs]
    if hasattr(inputs, "features"):  # a datasets.Dataset: read in Arrow batches
        return [python_source(inputs)]
    items = iter(inputs)
    first = next(items, None)
    if first is None:
        raise SourceError("no inputs given")
    if not isinstance(first, str | Path):
        return [python_source(itertools.chain([first], items))]
    given = [str(p) for p in itertools.chain([first], items) if isinstance(p, str | Path)]
    try:
        entries = [[None] if p == "-" else locate(p).matches() for p in given]
    except StorageError as error:
        raise SourceError(f"input {error}") from None
    found = [entry for matched in entries for entry in matched]
    files = [entry for entry in found if entry is not None]
    if len(set(files)) != len(files) or len(found) - len(files) > 1:
        raise SourceError("an input is given twice")
    names = _names(files)
    return [open_source("-") if entry is None else open_source(entry, names[entry]) for entry in found]


def _names(files: list[Location]) -> dict[Location, str]:
    """Each file named relative to the folder all share, so that output bytes do not
    depend on how a path was typed (or on the bucket a URL names); by its full URL where
    the inputs are in several stores."""
    if len({file.store for file in files}) > 1:
        return {file: str(file) for file in files}
    parents = [file.parent() for file in files]
    if files and files[0].is_local:
        base = locate(os.path.commonpath([parent.key() for parent in parents]))
    elif files:
        base = Location(files[0].store, posixpath.commonpath([parent.path for parent in parents]))
    return {file: file.relative_to(base) for file in files}
