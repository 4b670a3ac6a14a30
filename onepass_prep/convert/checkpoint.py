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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onepass_prep.format import MANIFEST, REJECTED

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

    @classmethod
    def start(cls, out_dir: Path, fingerprint: dict, overwrite: bool, resume: bool) -> Checkpoint:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume and (out_dir / PROGRESS).is_file():
            return cls._resume(out_dir, fingerprint)
        if resume and (out_dir / MANIFEST).is_file():
            raise RunError(f"{out_dir} holds a finished run; nothing to resume")
        entries = list(out_dir.iterdir())
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
    return name.startswith(("part-", MANIFEST, REJECTED, PROGRESS))
