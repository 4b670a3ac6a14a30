"""Where `convert` reads and writes: a local path or a URL (`s3://`, `gs://`, any
filesystem fsspec knows by its scheme), as one `Location` type, so that sources, shards
and the checkpoint never ask which. One adapter per kind of storage:

- `_Local`: the operating system's files, exactly as before URLs existed (a shard is
  written under a temporary name and renamed; the lock is an `O_EXCL` create).
- `_Objects`: an object store through fsspec (s3fs, gcsfs, ...), credentials and endpoint
  from the store's own configuration (for S3 the usual credential chain and
  `AWS_ENDPOINT_URL`). An object appears whole or not at all (one PUT, or a multipart
  upload completed at the end), so there is nothing to rename; the lock is a conditional
  create (`If-None-Match: *` on S3); text that grows as a run goes (`rejected.jsonl`, the
  progress record) is kept as one object per append under `NAME.d/` and joined into
  `NAME` when the run is sealed (docs/scaling.md, "Object storage").

Reading counts the bytes it fetches (`bytes_fetched`), so tests and benchmarks can hold
the driver of a Ray run to reading no record bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, Protocol

CHUNK = 1 << 20
URL = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://")
# Fail fast on a store that is down or misconfigured: a few seconds, not minutes of retries.
OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {
        "use_listings_cache": False,  # workers write what the driver lists
        "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2}},
    },
}
RETRIES = {"s3": 2}  # s3fs's own retries around botocore's (5 by default, with back-off)
_fetched = [0]  # bytes read through Location.open by this process


class StorageError(Exception):
    """A location that cannot be used: one line naming it and saying why."""


def bytes_fetched() -> int:
    """Bytes this process has read from inputs (fetched from the store, for URLs)."""
    return _fetched[0]


def locate(where: str | os.PathLike[str]) -> Location:
    """The location a command-line argument names: a URL by its scheme, else a local path."""
    text = os.fspath(where)
    found = URL.match(text)
    if not found or found["scheme"] == "file":
        return Location(_LOCAL, text.removeprefix("file://") if found else text)
    return Location(_objects(found["scheme"]), text[found.end():].rstrip("/"))


class Location:
    """A file or folder (prefix) of a store. Pickled as its URL or absolute path, so a
    worker that receives it opens the store with its own credentials."""

    def __init__(self, store: _Store, path: str):
        self.store = store
        self.path = path

    def __str__(self) -> str:
        return self.store.show(self.path)

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def __reduce__(self) -> tuple[Callable[[str], Location], tuple[str]]:
        return locate, (self.key(),)

    def __truediv__(self, name: str) -> Location:
        return Location(self.store, self.store.join(self.path, name))

    def key(self) -> str:
        """What the location points to, however it was written (an absolute path, a URL)."""
        return self.store.key(self.path)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.replace(os.sep, "/"))

    @property
    def is_local(self) -> bool:
        return self.store is _LOCAL

    def relative_to(self, folder: Location) -> str:
        return self.store.relative(self.path, folder.path)

    def parent(self) -> Location:
        return Location(self.store, self.store.parent(self.path))

    def matches(self) -> list[Location]:
        """The files a pattern (`s3://b/chats/*.jsonl.zst`) names, in order; a path
        without `*?[` names itself. Local patterns are the shell's to expand."""
        return [Location(self.store, path) for path in self.store.call(self, self.store.matches)]

    # reading
    def is_dir(self) -> bool:
        return self.store.call(self, self.store.is_dir)

    def is_file(self) -> bool:
        return self.store.call(self, self.store.is_file)

    def size(self) -> int:
        return self.store.call(self, self.store.size)

    def version(self) -> str | None:
        """What the store says identifies this content (an object's ETag), None for a
        local file (its bytes are hashed instead)."""
        return self.store.call(self, self.store.version)

    def files(self) -> list[str]:
        """Every file below this folder, as paths relative to it ('/'-separated)."""
        return self.store.call(self, self.store.files)

    def children(self) -> list[str]:
        """The names directly in this folder (files and sub-folders)."""
        return self.store.call(self, self.store.children)

    @contextmanager
    def open(self, sequential: bool = True) -> Iterator[IO[bytes]]:
        """The file for reading; `sequential` reads ahead (records), else fetches only
        the ranges asked for (a head, a Parquet footer)."""
        handle = self.store.call(self, self.store.open, sequential)
        try:
            yield handle
        finally:
            _fetched[0] += self.store.fetched(handle)
            handle.close()

    def read_bytes(self) -> bytes:
        with self.open() as handle:
            return handle.read()

    def text(self) -> str | None:
        """The file's text, None if there is no such file."""
        return self.store.call(self, self.store.text)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with self.open() as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    # writing
    def make_folder(self) -> None:
        self.store.call(self, self.store.make_folder)

    def put(self, write: Callable[[IO[bytes]], None]) -> None:
        """Write the file whole or not at all: nobody sees it until `write` has returned."""
        self.store.call(self, self.store.put, write)

    def create(self, data: bytes) -> bool:
        """Create the file with `data` if it does not exist (atomically); False if it does."""
        return self.store.call(self, self.store.create, data)

    def delete(self) -> None:
        """Remove the file (a folder with what it holds); nothing if it is not there."""
        self.store.call(self, self.store.delete)

    def append(self, data: bytes) -> None:
        self.store.call(self, self.store.append, data)

    def appended(self) -> bytes:
        """What was appended, in order (b"" if nothing)."""
        return self.store.call(self, self.store.appended)

    def cut(self, size: int) -> None:
        """Drop what was appended past `size` bytes (`size` is where an append ended)."""
        self.store.call(self, self.store.cut, size)

    def seal(self) -> None:
        """Make what was appended the whole file under its own name (made if nothing was)."""
        self.store.call(self, self.store.seal)


class _Store(Protocol):
    """What a kind of storage does for `Location`; paths are the store's own strings."""

    def show(self, path: str) -> str: ...
    def key(self, path: str) -> str: ...
    def join(self, path: str, name: str) -> str: ...
    def parent(self, path: str) -> str: ...
    def relative(self, path: str, folder: str) -> str: ...
    def matches(self, path: str) -> list[str]: ...
    def is_dir(self, path: str) -> bool: ...
    def is_file(self, path: str) -> bool: ...
    def size(self, path: str) -> int: ...
    def version(self, path: str) -> str | None: ...
    def text(self, path: str) -> str | None: ...
    def files(self, path: str) -> list[str]: ...
    def children(self, path: str) -> list[str]: ...
    def open(self, path: str, sequential: bool) -> IO[bytes]: ...
    def fetched(self, handle: IO[bytes]) -> int: ...
    def make_folder(self, path: str) -> None: ...
    def put(self, path: str, write: Callable[[IO[bytes]], None]) -> None: ...
    def create(self, path: str, data: bytes) -> bool: ...
    def delete(self, path: str) -> None: ...
    def append(self, path: str, data: bytes) -> None: ...
    def appended(self, path: str) -> bytes: ...
    def cut(self, path: str, size: int) -> None: ...
    def seal(self, path: str) -> None: ...

    def call(self, location: Location, method: Callable[..., Any], *args: Any) -> Any:
        return method(location.path, *args)


class _Local(_Store):
    def show(self, path: str) -> str:
        return path

    def key(self, path: str) -> str:
        return os.path.realpath(path)

    def join(self, path: str, name: str) -> str:
        return os.path.join(path, name)

    def parent(self, path: str) -> str:
        return os.path.dirname(os.path.realpath(path))

    def relative(self, path: str, folder: str) -> str:
        return os.path.relpath(self.key(path), self.key(folder))

    def matches(self, path: str) -> list[str]:
        return [path]

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def is_file(self, path: str) -> bool:
        return os.path.isfile(path)

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def version(self, path: str) -> str | None:
        return None

    def text(self, path: str) -> str | None:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def files(self, path: str) -> list[str]:
        return [
            posixpath.join(os.path.relpath(folder, path).replace(os.sep, "/"), name).removeprefix("./")
            for folder, _, names in os.walk(path) for name in names
        ]

    def children(self, path: str) -> list[str]:
        return os.listdir(path)

    def open(self, path: str, sequential: bool) -> IO[bytes]:
        return io.BufferedReader(_Counted(io.FileIO(path)))

    def fetched(self, handle: IO[bytes]) -> int:
        raw = getattr(handle, "raw", None)
        return raw.count if isinstance(raw, _Counted) else 0

    def make_folder(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def put(self, path: str, write: Callable[[IO[bytes]], None]) -> None:
        temporary = f"{path}.tmp{os.getpid()}"
        try:
            with open(temporary, "wb") as handle:
                write(handle)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)

    def create(self, path: str, data: bytes) -> bool:
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        return True

    def delete(self, path: str) -> None:
        if os.path.isdir(path):
            import shutil

            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)

    def append(self, path: str, data: bytes) -> None:
        with open(path, "ab") as handle:
            handle.write(data)

    def appended(self, path: str) -> bytes:
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return b""

    def cut(self, path: str, size: int) -> None:
        with open(path, "ab") as handle:
            handle.truncate(size)

    def seal(self, path: str) -> None:
        open(path, "ab").close()


class _Objects(_Store):
    """An object store through an fsspec filesystem; `path` is `bucket/key`."""

    PARTS = ".d"  # NAME.d/00000000, 00000001, ...: what was appended to NAME
    BATCH = 256  # parts fetched at once

    def __init__(self, scheme: str, filesystem: Any):
        self.scheme = scheme
        self.fs = filesystem
        self._appends: dict[str, int] = {}  # parts appended to each file, once listed

    def show(self, path: str) -> str:
        return f"{self.scheme}://{path}"

    key = show

    def join(self, path: str, name: str) -> str:
        return f"{path}/{name}"

    def parent(self, path: str) -> str:
        return posixpath.dirname(path)

    def relative(self, path: str, folder: str) -> str:
        return path[len(folder) + 1:] if folder else path

    def matches(self, path: str) -> list[str]:
        if not re.search(r"[*?\[]", path):
            return [path]
        self._bucket(path)
        found = sorted(self.fs.glob(path))
        if not found:
            raise StorageError(f"{self.show(path)}: no file matches")
        return found

    def call(self, location: Location, method: Callable[..., Any], *args: Any) -> Any:
        try:
            return method(location.path, *args)
        except StorageError:
            raise
        except Exception as error:
            raise StorageError(f"{location}: {_reason(error)}") from error

    def is_dir(self, path: str) -> bool:
        self._bucket(path)
        return "/" not in path or self.fs.isdir(path)

    def is_file(self, path: str) -> bool:
        self._bucket(path)
        return "/" in path and self.fs.isfile(path)

    def _bucket(self, path: str) -> None:
        """Say so if the bucket is missing (the store answers 'no such key' otherwise)."""
        bucket = path.split("/", 1)[0]
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            raise StorageError(f"{self.show(bucket)}: no such bucket") from None

    def size(self, path: str) -> int:
        return int(self.fs.size(path))

    def version(self, path: str) -> str | None:
        info = self.fs.info(path)
        tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("generation")
        return str(tag).strip('"') if tag else None

    def text(self, path: str) -> str | None:
        try:
            return self.fs.cat_file(path).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None

    def files(self, path: str) -> list[str]:
        return sorted(found[len(path) + 1:] for found in self.fs.find(path))

    def children(self, path: str) -> list[str]:
        try:
            found = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []  # a prefix nothing was written under yet
        return [posixpath.basename(entry.rstrip("/")) for entry in found]

    def open(self, path: str, sequential: bool) -> IO[bytes]:
        if sequential:
            handle = self.fs.open(path, "rb", block_size=CHUNK * 8, cache_type="readahead")
        else:
            handle = self.fs.open(path, "rb", cache_type="none")
        handle.cache.fetcher = _CountedFetches(handle.cache.fetcher)
        return io.BufferedReader(handle) if sequential else handle  # lines from a buffer, not a request each

    def fetched(self, handle: IO[bytes]) -> int:
        fetcher = getattr(getattr(getattr(handle, "raw", handle), "cache", None), "fetcher", None)
        return fetcher.count if isinstance(fetcher, _CountedFetches) else 0

    def make_folder(self, path: str) -> None:
        self._bucket(path)  # a prefix needs no making

    def put(self, path: str, write: Callable[[IO[bytes]], None]) -> None:
        buffer = io.BytesIO()
        write(buffer)
        self.fs.pipe_file(path, buffer.getvalue())  # one PUT, or a multipart upload completed last

    def create(self, path: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(path, data, mode="create")
        except TypeError:
            raise StorageError(
                f"{self.show(path)}: this store's fsspec filesystem has no conditional write "
                "(mode='create'), so a run cannot lock its output there"
            ) from None
        except (FileExistsError, PermissionError) as error:
            if isinstance(error, PermissionError) and "PreconditionFailed" not in str(error.__cause__ or error):
                raise
            return False
        except OSError as error:
            if "PreconditionFailed" in str(error) or "412" in str(error):
                return False
            raise
        return True

    def delete(self, path: str) -> None:
        self._appends.pop(path.removesuffix(self.PARTS), None)
        for found in (path, path + self.PARTS):
            if self.fs.exists(found):
                self.fs.rm(found, recursive=True)

    def _parts(self, path: str) -> list[dict]:
        found = self.fs.find(path + self.PARTS, detail=True)
        return [found[name] for name in sorted(found)]

    def _contents(self, parts: list[dict]) -> Iterator[bytes]:
        """The parts' bytes in order, fetched `BATCH` at a time, concurrently."""
        for first in range(0, len(parts), self.BATCH):
            names = [part["name"] for part in parts[first : first + self.BATCH]]
            fetched = self.fs.cat(names)
            yield from (fetched[name] for name in names)

    def append(self, path: str, data: bytes) -> None:
        if path not in self._appends:  # listed once; then counted here (one writer: the lock)
            self._appends[path] = len(self._parts(path))
        self.fs.pipe_file(f"{path}{self.PARTS}/{self._appends[path]:08d}", data)
        self._appends[path] += 1

    def appended(self, path: str) -> bytes:
        return b"".join(self._contents(self._parts(path)))

    def cut(self, path: str, size: int) -> None:
        total, kept = 0, 0
        for part in self._parts(path):
            if total >= size:
                self.fs.rm(part["name"])
            else:
                total, kept = total + int(part["size"]), kept + 1
        self._appends[path] = kept

    def seal(self, path: str) -> None:
        with self.fs.open(path, "wb") as whole:  # appears when complete
            for data in self._contents(self._parts(path)):
                whole.write(data)
        self.delete(path + self.PARTS)


class _CountedFetches:
    """An fsspec file's range requests, counting the bytes they bring."""

    def __init__(self, fetch: Callable[[int, int], bytes]):
        self.fetch, self.count = fetch, 0

    def __call__(self, start: int, stop: int) -> bytes:
        data = self.fetch(start, stop)
        self.count += len(data)
        return data


class _Counted(io.RawIOBase):
    """A local file that counts the bytes read from it."""

    def __init__(self, raw: io.FileIO):
        self.raw, self.count = raw, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size = self.raw.readinto(buffer) or 0
        self.count += size
        return size

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        self.raw.close()
        super().close()


_LOCAL = _Local()
_stores: dict[str, _Objects] = {}


def _objects(scheme: str) -> _Objects:
    if scheme not in _stores:
        try:
            import fsspec

            filesystem = fsspec.filesystem(scheme, skip_instance_cache=True, **OPTIONS.get(scheme, {}))
            if scheme in RETRIES:
                filesystem.retries = RETRIES[scheme]
        except ImportError as error:
            package = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(scheme, error.name)
            raise StorageError(
                f"{scheme}:// needs {package}: pip install 'onepass-prep[storage]' (or {package})"
            ) from None
        except ValueError as error:
            raise StorageError(f"{scheme}://: {_reason(error)}") from None
        _stores[scheme] = _Objects(scheme, filesystem)
    return _stores[scheme]


def _reason(error: BaseException) -> str:
    """One line for what a store's client raised."""
    names = {type(cause).__name__ for cause in _causes(error)}
    text = " ".join(str(error).split()) or type(error).__name__
    if "NoCredentialsError" in names or "Unable to locate credentials" in text:
        return "no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or a role)"
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError"}:
        return f"cannot reach the store's endpoint ({text})"
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return "no such bucket"
    if isinstance(error, FileNotFoundError):
        return "no such file or folder"
    if isinstance(error, PermissionError):
        return f"access denied ({text})"
    return text


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__
