"""Where a run stands, so that an interrupted `convert` can be resumed to exactly the
output an uninterrupted run would have written.

The input is converted in chunks of a fixed number of records, each packed on its own
into the shard of its number (work.py), so a chunk's output depends on its records only.
As each chunk is complete, in input order, `.progress.jsonl` gets a line: its shard, the
length of `rejected.jsonl` and the run's counts by then (appended, so saving costs the
same however long the run).
Resuming drops any later shard and rejection, reads past the finished chunks and
converts the rest.

The output is a `Location`: a local folder or a prefix of an object store, the same
steps for both (storage.py says how each keeps a file from looking complete early).
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
from dataclasses import dataclass, field

from onepass_prep.convert.storage import Location
from onepass_prep.format import LOCK, MANIFEST, REJECTED, judge_lock

PROGRESS = ".progress.jsonl"  # the fingerprint, then one line per finished chunk


class RunError(Exception):
    """The output folder cannot be used as asked."""


@dataclass
class Done:
    """The finished chunks 0 .. chunks - 1."""

    chunks: int = 0
    rejected_bytes: int = 0  # length of rejected.jsonl when they were done
    counts: dict = field(default_factory=dict)  # the run's counts by then
    shards: list[dict] = field(default_factory=list)


@dataclass
class Checkpoint:
    out_dir: Location
    fingerprint: dict
    done: Done = field(default_factory=Done)
    notes: list[str] = field(default_factory=list)  # things the user should hear of

    @classmethod
    def start(cls, out_dir: Location, fingerprint: dict, overwrite: bool, resume: bool) -> Checkpoint:
        """Take the folder's lock and set it up for a fresh or resumed run; `release`
        gives the lock back, however the run ends."""
        if out_dir.is_file():
            raise RunError(f"output {out_dir}: is a file, not a folder")
        out_dir.make_folder()
        notes = _lock(out_dir)
        try:
            checkpoint = cls._start(out_dir, fingerprint, overwrite, resume)
        except BaseException:
            (out_dir / LOCK).delete()
            raise
        checkpoint.notes = notes
        return checkpoint

    def release(self) -> None:
        (self.out_dir / LOCK).delete()

    @classmethod
    def _start(cls, out_dir: Location, fingerprint: dict, overwrite: bool, resume: bool) -> Checkpoint:
        progress = (out_dir / PROGRESS).appended() if resume else b""
        if progress:
            return cls._resume(out_dir, fingerprint, progress)
        if resume and (out_dir / MANIFEST).is_file():
            raise RunError(f"{out_dir} holds a finished run; nothing to resume")
        entries = [name for name in out_dir.children() if name != LOCK]  # ours, just taken
        ours = [name for name in entries if _is_ours(name)]
        if len(ours) != len(entries):
            raise RunError(f"output folder {out_dir} holds files onepass-prep did not write")
        if ours and not (overwrite or resume):  # resuming a run that completed no shard: restart
            raise RunError(
                f"output folder {out_dir} is not empty (pass --overwrite to replace it, "
                "or --resume to continue an interrupted run)"
            )
        for name in ours:
            (out_dir / name).delete()
        return cls(out_dir, fingerprint)

    @classmethod
    def _resume(cls, out_dir: Location, fingerprint: dict, progress: bytes) -> Checkpoint:
        lines = progress.splitlines(keepends=True)
        saved = json.loads(lines[0])
        if saved["fingerprint"] != fingerprint:
            changed = sorted(k for k in fingerprint if saved["fingerprint"].get(k) != fingerprint[k])
            raise RunError(f"cannot resume {out_dir}: {', '.join(changed)} changed since the run began")
        done = Done()
        for line in lines[1:]:
            if not line.endswith(b"\n"):
                break  # cut short by the interruption
            entry = json.loads(line)
            done = Done(entry["chunk"] + 1, entry["rejected_bytes"], entry["counts"], [*done.shards, entry["shard"]])
        (out_dir / PROGRESS).cut(sum(map(len, lines[: len(done.shards) + 1])))
        keep = {shard["file"] for shard in done.shards}
        for name in out_dir.children():
            if name.startswith("part-") and name not in keep:
                (out_dir / name).delete()  # an unfinished shard, or one finished after the last save
        (out_dir / REJECTED).cut(done.rejected_bytes)
        return cls(out_dir, fingerprint, done)

    def begin(self) -> None:
        """Start the progress file of a fresh run."""
        if not self.done.chunks:
            (self.out_dir / PROGRESS).cut(0)
            (self.out_dir / PROGRESS).append((json.dumps({"fingerprint": self.fingerprint}) + "\n").encode())

    def save(self, shard: dict, rejected_bytes: int, counts: dict) -> None:
        """Called as each chunk is complete, in input order."""
        entry = {"chunk": self.done.chunks, "shard": shard, "rejected_bytes": rejected_bytes, "counts": counts}
        (self.out_dir / PROGRESS).append((json.dumps(entry) + "\n").encode())
        self.done = Done(self.done.chunks + 1, rejected_bytes, counts, [*self.done.shards, shard])

    def drop_leftovers(self) -> None:
        """Remove the temporary file of a shard whose writer was killed (its chunk was
        written again by another), before the manifest says the folder is complete."""
        for name in fnmatch.filter(self.out_dir.children(), "part-*.parquet.tmp*"):
            (self.out_dir / name).delete()

    def finish(self) -> None:
        (self.out_dir / PROGRESS).delete()


def _is_ours(name: str) -> bool:
    return name.startswith(("part-", MANIFEST, REJECTED, PROGRESS, LOCK))


def _lock(out_dir: Location) -> list[str]:
    """Create the lock file atomically (a conditional write on an object store), or
    refuse: one convert per folder at a time. A lock left by a process that is gone
    (killed) is taken over, and said so."""
    notes: list[str] = []
    lock = out_dir / LOCK
    for _ in range(2):
        if lock.create(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()):
            return notes
        text = lock.text()
        if text is None:
            continue  # released between our two looks
        holder = judge_lock(text)
        if holder["alive"]:
            raise RunError(
                f"{out_dir} is in use by another convert (pid {holder['pid']} on {holder['host']}); "
                f"if no such run is going on, delete {lock}"
            ) from None
        notes.append(f"took over the lock left in {out_dir} by pid {holder['pid']}, which is gone")
        lock.delete()
    raise RunError(f"{out_dir}: could not take the lock {LOCK}")
