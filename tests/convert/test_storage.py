"""`convert` from and to S3: a real endpoint (moto's server on 127.0.0.1), reached through
the environment a user's S3 client reads (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
Every input kind from URLs gives the bytes of a local run of the same files; the output
on S3 never looks finished before it is, resumes to the same bytes, refuses a second run;
a store that cannot be used is one line, at once. Ray runs on S3: test_ray.py."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
from helpers.services import free_port
from helpers.stores import BUCKET, comparable, options, s3_client, s3_files

from onepass_prep.convert import ConvertError, convert, storage

pytest.importorskip("moto")


def test_s3_inputs_to_an_s3_output_write_the_local_runs_bytes(chats):
    out = f"s3://{BUCKET}/local-engine"
    summary = convert(chats.urls, out, options())
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
