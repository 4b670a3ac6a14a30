"""`convert` from and to S3: a real endpoint (moto's server on 127.0.0.1), reached through
the environment a user's S3 client reads (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
Every input kind from URLs gives the bytes of a local run of the same files; the output
on S3 never looks finished before it is, resumes to the same bytes, refuses a second run;
a store that cannot be used is one line, at once. Ray runs on S3: test_ray.py."""

from __future__ import annotations

import gzip
import json
import os
import socket
import time

import pytest
from helpers.services import free_port
from helpers.stores import BUCKET, comparable, options, s3_client, s3_files

from onepass_prep.convert import ConvertError, convert, storage
from onepass_prep.convert.sources import open_source

pytest.importorskip("moto")


def test_s3_inputs_to_an_s3_output_write_the_local_runs_bytes(chats):
    out = f"s3://{BUCKET}/local-engine"
    summary = convert([f"{chats.url}/*"], out, options())  # a pattern: the three files, in order
    assert summary.rejected >= 4
    written = s3_files(out)
    assert comparable(written) == comparable(chats.expected)
    assert written["rejected.jsonl"] == chats.expected["rejected.jsonl"]  # sources named as locally
    assert json.loads(written["manifest.json"])["inputs"][0]["sha256"] is None

    with pytest.raises(ConvertError, match="is not empty"):
        convert(chats.urls, out, options())  # a second run into a prefix that holds one
    client = s3_client()
    lock = {"pid": os.getpid(), "host": socket.gethostname()}  # a live convert holds it
    client.put_object(Bucket=BUCKET, Key="held/.onepass-prep.lock", Body=json.dumps(lock).encode())
    with pytest.raises(ConvertError, match="in use by another convert"):
        convert(chats.urls, f"s3://{BUCKET}/held", options(overwrite=True))
    assert s3_files(f"s3://{BUCKET}/held") == {".onepass-prep.lock": json.dumps(lock).encode()}


def test_an_interrupted_s3_run_resumes_to_the_same_bytes(chats):
    out = f"s3://{BUCKET}/resumed"
    chunks = []

    def interrupt(size: int, _total: int | None) -> None:
        chunks.append(size)
        if len(chunks) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(chats.urls, out, options(), interrupt)
    left = s3_files(out)
    assert "manifest.json" not in left and "rejected.jsonl" not in left  # nothing looks finished
    assert [name for name in left if name.startswith("part-")] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert any(name.startswith(".progress.jsonl.d/") for name in left)
    with pytest.raises(ConvertError, match="is not empty"):
        convert(chats.urls, out, options())
    convert(chats.urls, out, options(resume=True))
    assert comparable(s3_files(out)) == comparable(chats.expected)


@pytest.mark.parametrize("problem", ["missing bucket", "missing credentials", "unreachable endpoint"])
def test_a_store_that_cannot_be_used_is_one_line_at_once(chats, monkeypatch, problem):
    monkeypatch.setattr(storage, "_stores", {})  # a new client, which reads the environment again
    inputs, out = chats.urls, f"s3://{BUCKET}/errors"
    if problem == "missing bucket":
        inputs, expected = [f"s3://no-such-bucket/{name}" for name in ("a.jsonl", "b.jsonl")], "no such bucket"
    elif problem == "missing credentials":
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        expected = "no credentials found"
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
        expected = "cannot reach the store's endpoint"
    started = time.monotonic()
    with pytest.raises(ConvertError) as raised:
        convert(inputs, out, options())
    message = str(raised.value)
    assert expected in message and message.startswith("input s3://") and "\n" not in message, message
    assert time.monotonic() - started < 20


def test_an_s3_output_in_a_missing_bucket_is_one_line(chats):
    with pytest.raises(ConvertError, match=r"^s3://no-such-bucket: no such bucket$"):
        convert(chats.urls, "s3://no-such-bucket/out", options())


def test_every_input_kind_reads_from_s3_as_from_a_folder(s3, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"id": str(i), "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
               for i in range(9)]
    text = "".join(json.dumps(record) + "\n" for record in records).encode()
    (tmp_path / "chats.jsonl.gz").write_bytes(gzip.compress(text))
    (tmp_path / "chats.json").write_text(json.dumps(records))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for part in range(2):
        table = pa.Table.from_pylist(records[part * 5 : part * 5 + 5])
        pq.write_table(table, tmp_path / "hub" / "data" / f"train-{part:05d}-of-00002.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    client = s3_client()
    client.create_bucket(Bucket="kinds")
    for path in tmp_path.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "kinds", path.relative_to(tmp_path).as_posix())
    for name in ("chats.jsonl.gz", "chats.json", "hub", "saved"):
        local, remote = open_source(tmp_path / name, name), open_source(f"s3://kinds/{name}", name)
        assert (remote.kind, remote.count()) == (local.kind, local.count()), name
        assert list(remote.records()) == list(local.records()), name
        assert list(remote.records(4)) == list(local.records(4)), name
    assert open_source("s3://kinds/hub").kind == "parquet-folder"


def test_a_pattern_that_matches_nothing_is_one_line(chats):
    with pytest.raises(ConvertError, match=r"^input s3://onepass/chats/\*\.parquet\.gz: no file matches$"):
        convert([f"{chats.url}/*.parquet.gz"], f"s3://{BUCKET}/nothing", options())
