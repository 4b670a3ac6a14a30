"""The plan of a Ray run: which records make each chunk and where a worker finds them,
made by the driver without reading a record, so that workers read their chunks
themselves (ray_engine.py).

A chunk is the same run of records as the local engine's (work.py's `read_chunks`):
records `k * R + 1 .. (k + 1) * R` of the inputs taken one after another, blank JSONL
lines included. Placing them needs each input's record count:

- Parquet: from the files' footers, read by the driver (metadata, not records).
- plain JSONL: a counting pass over the bytes, cut into `BLOCK`-byte blocks that the
  workers count in parallel (newlines per `STEP` bytes). A chunk of a file then starts at
  the step holding its first line: the worker reads from there, skipping less than one
  step's bytes.
- everything else (compressed JSONL, JSON arrays, Arrow): one worker counts the whole
  input, and a chunk's worker reads the input from its start, skipping the records
  before its chunk (a compressed stream cannot be entered in the middle).
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from onepass_prep.convert.sources import START, Position, Source

STEP = 1 << 20  # where a chunk's worker may start reading plain JSONL: at a multiple of it
BLOCK = 64 * STEP  # bytes of plain JSONL a worker counts in one job (a multiple of STEP)
PARQUET = ("parquet", "parquet-folder")


@dataclass(frozen=True)
class Piece:
    """`count` records of source `source` from record number `first`, read from `at`."""

    source: int
    first: int
    count: int
    at: Position = START


@dataclass(frozen=True)
class ChunkPlan:
    index: int
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Count:
    """A counting job for a worker: the newlines in each `step` bytes of one block of a
    plain JSONL file (`length` bytes from `offset`), or (`length` -1) the records of a
    whole source."""

    source: int
    offset: int = 0
    length: int = -1
    step: int = 0


def counting_jobs(sources: list[Source]) -> list[Count]:
    jobs: list[Count] = []
    for index, source in enumerate(sources):
        if source.kind in PARQUET:
            continue
        if source.kind == "jsonl" and source.size is not None:
            jobs += [Count(index, offset, min(BLOCK, source.size - offset), STEP)
                     for offset in range(0, source.size, BLOCK)]
        else:
            jobs.append(Count(index))
    return jobs


class _Lines:
    """Where the lines of a plain JSONL file lie, from its blocks' newline counts per step
    (8 bytes a step: 40 MB for 5 TB of JSONL)."""

    def __init__(self, blocks: list[tuple[list[int], bool]], step: int):
        self.step = step
        self.before = array("q", [0])  # newlines before each step
        for counts, _ in blocks:
            for newlines in counts:
                self.before.append(self.before[-1] + newlines)
        ends_open = bool(blocks) and not blocks[-1][1]  # a last line without a newline
        self.count = self.before[-1] + ends_open

    def position(self, number: int) -> Position:
        """Where to start reading to reach line `number`: the start of the step that
        holds the newline ending line `number - 1`."""
        if number == 1:
            return START
        step = bisect.bisect_left(self.before, number - 1) - 1
        return Position(step * self.step, self.before[step] + 1)


def plan_chunks(
    sources: list[Source], records: int, first_chunk: int, counted: dict[Count, object]
) -> Iterator[ChunkPlan]:
    """The chunks from `first_chunk` on, given the counting jobs' answers."""
    counts: list[int] = []
    lines: dict[int, _Lines] = {}
    for index, source in enumerate(sources):
        if source.kind in PARQUET:
            counts.append(source.count() or 0)
        elif source.kind == "jsonl" and source.size is not None:
            blocks = [answer for job, answer in sorted(counted.items(), key=lambda item: item[0].offset)
                      if job.source == index]
            lines[index] = _Lines(blocks, STEP)  # type: ignore[arg-type]
            counts.append(lines[index].count)
        else:
            counts.append(int(counted[Count(index)]))  # type: ignore[call-overload]
    total = sum(counts)
    for chunk in range(first_chunk, (total + records - 1) // records):
        pieces, first, left = [], chunk * records, records  # first: records before the chunk
        for index, count in enumerate(counts):
            if left and first < count:
                take = min(count - first, left)
                at = lines[index].position(first + 1) if index in lines else START
                pieces.append(Piece(index, first + 1, take, at))
                left -= take
            first = max(first - count, 0)
        yield ChunkPlan(chunk, tuple(pieces))
