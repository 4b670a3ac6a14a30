"""The plan of a Ray run (plan.py) names the same chunks as the local engine reads: for
plain JSONL found from per-step newline counts (steps made tiny here, so that lines span
steps and blocks, chunks start mid-step and span files), for compressed JSONL and Parquet
from record counts. The counting jobs run here as a worker runs them."""

from __future__ import annotations

import gzip
import itertools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onepass_prep.convert import plan
from onepass_prep.convert.sources import count_lines, open_source
from onepass_prep.convert.work import read_chunks


def answer(sources, job):
    source = sources[job.source]
    if job.length >= 0:
        return count_lines(source.files[0], job.offset, job.length, job.step)
    return sum(1 for _ in source.records())


@pytest.mark.parametrize("records", [1, 3, 7, 40])
@pytest.mark.parametrize("final_newline", [True, False])
def test_planned_chunks_are_the_local_engines(tmp_path, monkeypatch, records, final_newline):
    monkeypatch.setattr(plan, "STEP", 16)
    monkeypatch.setattr(plan, "BLOCK", 48)
    lines = [b'{"id": "%d", "pad": "%s"}' % (i, b"x" * (i * 7 % 50)) for i in range(30)]
    lines[4] = lines[9] = b""  # blank lines are records too (numbered, then skipped)
    text = b"\n".join(lines) + (b"\n" if final_newline else b"")
    (tmp_path / "a.jsonl").write_bytes(text)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines[:11]) + b"\n"))
    pq.write_table(pa.table({"messages": [f'[{{"i": {i}}}]' for i in range(13)]}), tmp_path / "c.parquet", row_group_size=4)
    (tmp_path / "d.jsonl").write_bytes(b"")
    (tmp_path / "e.jsonl").write_bytes(text[:40])
    sources = [open_source(tmp_path / name, name) for name in ("a.jsonl", "b.jsonl.gz", "c.parquet", "d.jsonl", "e.jsonl")]
    jobs = plan.counting_jobs(sources)
    assert len([job for job in jobs if job.source == 0]) == -(-len(text) // 48)
    counted = {job: answer(sources, job) for job in jobs}
    for first_chunk in (0, 2):
        expected = [
            (chunk.index, [line for batch in chunk.batches for line in batch])
            for chunk in read_chunks(sources, records, first_chunk, lambda _: None)
        ]
        planned = [
            (chunk.index, [
                (sources[piece.source].name, number, raw)
                for piece in chunk.pieces
                for number, raw in itertools.islice(sources[piece.source].records(piece.first, at=piece.at), piece.count)
            ])
            for chunk in plan.plan_chunks(sources, records, first_chunk, counted)
        ]
        assert planned == expected
        starts = [piece.at.offset for chunk in plan.plan_chunks(sources, records, 0, counted) for piece in chunk.pieces]
        assert records > 7 or any(offset % 48 for offset in starts)  # chunks start inside blocks
