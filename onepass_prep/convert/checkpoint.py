"""Where a run stands, so that an interrupted `convert` can be resumed to exactly the
output an uninterrupted run would have written.

The input is converted in chunks of a fixed number of records, each packed on its own
into the shard of its number (work.py), so a chunk's output depends on its records only.
As each chunk is complete, in input order, `.progress.jsonl` gets a line: its shard, the
length of `rejected.jsonl` and the run's counts by then (appended, so saving costs the
same however long the run).
Resuming drops any later shard and rejection, reads past the finished chunks and
converts the rest.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from onepass_prep.format import LOCK, MANIFEST, REJECTED, lock_holder

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
    out_dir: Path
    fingerprint: dict
    done: Done = field(default_factory=Done)
    notes: list[str] = field(default_factory=list)  # things the user should hear of

    @classmethod
    def start(cls, out_dir: Path, fingerprint: dict, overwrite: bool, resume: bool) -> Checkpoint:
        """Take the folder's lock and set it up for a fresh or resumed run; `release`
        gives the lock back, however the run ends."""
        if out_dir.exists() and not out_dir.is_dir():
            raise RunError(f"output {out_dir}: is a file, not a folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        notes = _lock(out_dir)
        try:
            checkpoint = cls._start(out_dir, fingerprint, overwrite, resume)
        except BaseException:
            (out_dir / LOCK).unlink(missing_ok=True)
            raise
        checkpoint.notes = notes
        return checkpoint

    def release(self) -> None:
        (self.out_dir / LOCK).unlink(missing_ok=True)

    @classmethod
    def _start(cls, out_dir: Path, fingerprint: dict, overwrite: bool, resume: bool) -> Checkpoint:
        if resume and (out_dir / PROGRESS).is_file():
            return cls._resume(out_dir, fingerprint)
        if resume and (out_dir / MANIFEST).is_file():
            raise RunError(f"{out_dir} holds a finished run; nothing to resume")
        entries = [path for path in out_dir.iterdir() if path.name != LOCK]  # ours, just taken
        ours = [path for path in entries if _is_ours(path.name)]
        if len(ours) != len(entries):
            raise RunError(f"output folder {out_dir} holds files onepass-prep did not write")
        if ours and not (overwrite or resume):  # resuming a run that completed no shard: restart
            raise RunError(
                f"output folder {out_dir} is not empty (pass --overwrite to replace it, "
                "or --resume to continue an interrupted run)"
            )
        for path in ours:
            path.unlink()
        return cls(out_dir, fingerprint)

    @classmethod
    def _resume(cls, out_dir: Path, fingerprint: dict) -> Checkpoint:
        lines = (out_dir / PROGRESS).read_bytes().splitlines(keepends=True)
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
        with open(out_dir / PROGRESS, "r+b") as progress:
            progress.truncate(sum(map(len, lines[: len(done.shards) + 1])))
        keep = {shard["file"] for shard in done.shards}
        for path in out_dir.iterdir():
            if path.name.startswith("part-") and path.name not in keep:
                path.unlink()  # an unfinished shard, or one finished after the last save
        with open(out_dir / REJECTED, "r+b") as rejected:
            rejected.truncate(done.rejected_bytes)
        return cls(out_dir, fingerprint, done)

    def begin(self) -> None:
        """Start the progress file of a fresh run."""
        if not self.done.chunks:
            line = json.dumps({"fingerprint": self.fingerprint}) + "\n"
            (self.out_dir / PROGRESS).write_text(line, encoding="utf-8")

    def save(self, shard: dict, rejected_bytes: int, counts: dict) -> None:
        """Called as each chunk is complete, in input order."""
        entry = {"chunk": self.done.chunks, "shard": shard, "rejected_bytes": rejected_bytes, "counts": counts}
        with open(self.out_dir / PROGRESS, "a", encoding="utf-8") as progress:
            progress.write(json.dumps(entry) + "\n")
        self.done = Done(self.done.chunks + 1, rejected_bytes, counts, [*self.done.shards, shard])

    def drop_leftovers(self) -> None:
        """Remove the temporary file of a shard whose writer was killed (its chunk was
        written again by another), before the manifest says the folder is complete."""
        for path in self.out_dir.glob("part-*.parquet.tmp*"):
            path.unlink()

    def finish(self) -> None:
        (self.out_dir / PROGRESS).unlink(missing_ok=True)


def _is_ours(name: str) -> bool:
    return name.startswith(("part-", MANIFEST, REJECTED, PROGRESS, LOCK))


def _lock(out_dir: Path) -> list[str]:
    """Create the lock file atomically, or refuse: one convert per folder at a time. A
    lock left by a process that is gone (killed) is taken over, and said so."""
    notes = []
    for _ in range(2):
        try:
            descriptor = os.open(out_dir / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock_holder(out_dir)
            if holder is None:
                continue  # released between our two looks
            if holder["alive"]:
                raise RunError(
                    f"{out_dir} is in use by another convert (pid {holder['pid']} on {holder['host']}); "
                    f"if no such run is going on, delete {out_dir / LOCK}"
                ) from None
            notes.append(f"took over the lock left in {out_dir} by pid {holder['pid']}, which is gone")
            (out_dir / LOCK).unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, handle)
        return notes
    raise RunError(f"{out_dir}: could not take the lock {LOCK}")
