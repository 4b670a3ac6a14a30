"""Where a run stands, so that an interrupted `convert` can be resumed to exactly the
output an uninterrupted run would have written.

The conversion is deterministic, and the packer empties its window at known points of
the input ("sync points"): after one, the rows to come depend only on the lines still to
read. Each time a shard is complete, `.progress.json` records the completed shards and
the last sync point before them: the next line to read, the rows written by then, the
length of `rejected.jsonl` and the counts. Resuming reads on from that line, drops the
regenerated rows the completed shards already hold, and writes the rest.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onepass_prep.format import LOCK, MANIFEST, REJECTED, lock_holder

PROGRESS = ".progress.json"


class RunError(Exception):
    """The output folder cannot be used as asked."""


@dataclass
class SyncPoint:
    file: int = 0  # index into the inputs
    line: int = 1  # next line to read there (1-based)
    rows: int = 0  # rows produced before this point
    rejected_bytes: int = 0  # length of rejected.jsonl at this point
    counts: dict = field(default_factory=dict)  # the run's counts at this point


@dataclass
class Checkpoint:
    out_dir: Path
    fingerprint: dict
    shards: list[dict] = field(default_factory=list)
    sync: SyncPoint = field(default_factory=SyncPoint)
    skip_rows: int = 0  # regenerated rows already in completed shards
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
        saved = json.loads((out_dir / PROGRESS).read_text(encoding="utf-8"))
        if saved["fingerprint"] != fingerprint:
            changed = sorted(k for k in fingerprint if saved["fingerprint"].get(k) != fingerprint[k])
            raise RunError(f"cannot resume {out_dir}: {', '.join(changed)} changed since the run began")
        shards, sync = saved["shards"], SyncPoint(**saved["sync"])
        keep = {shard["file"] for shard in shards}
        for path in out_dir.iterdir():
            if path.name.startswith("part-") and path.name not in keep:
                path.unlink()  # an unfinished shard, or one finished after the last save
        with open(out_dir / REJECTED, "r+b") as rejected:
            rejected.truncate(sync.rejected_bytes)
        skip = sum(shard["rows"] for shard in shards) - sync.rows
        return cls(out_dir, fingerprint, shards, sync, skip)

    def save(self, shards: list[dict]) -> None:
        """Called as each shard is completed."""
        self.shards = shards
        state = {"fingerprint": self.fingerprint, "shards": shards, "sync": asdict(self.sync)}
        temporary = self.out_dir / (PROGRESS + ".tmp")
        temporary.write_text(json.dumps(state), encoding="utf-8")
        os.replace(temporary, self.out_dir / PROGRESS)

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
