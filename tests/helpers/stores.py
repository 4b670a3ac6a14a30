"""Inputs and outputs of the storage tests: the same chats in a local folder and under an
S3 prefix, and the files of a run read back from either."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import synth

from onepass_prep.convert import ConvertOptions, convert

BUCKET = "onepass"
OPTIONS = ("--records-per-shard", "40", "--max-seq-len", "4096")


@dataclass
class Chats:
    """Inputs of three kinds (plain JSONL with a bad line in every chunk, zstd JSONL,
    Parquet) in a local folder and under an S3 prefix, and the files a local run of the
    local folder writes (the bytes every other run must write)."""

    folder: Path
    url: str
    expected: dict[str, bytes]

    @property
    def files(self) -> list[Path]:
        return sorted(self.folder.iterdir())

    @property
    def urls(self) -> list[str]:
        return [f"{self.url}/{path.name}" for path in self.files]


def options(**extra: object) -> ConvertOptions:
    """The ConvertOptions of OPTIONS."""
    return ConvertOptions(**{"model": "qwen", "records_per_shard": 40, "max_seq_len": 4096, **extra})  # type: ignore[arg-type]


def s3_client():  # noqa: ANN201
    import boto3

    return boto3.client("s3")


def s3_files(url: str) -> dict[str, bytes]:
    """Every object under an s3:// prefix, by its name under it."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = s3_client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return {
        item["Key"][len(prefix) + 1:]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        for item in sorted(listed, key=lambda item: item["Key"])
    }


def folder_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def comparable(files: dict[str, bytes]) -> dict[str, bytes]:
    """The files of a run, with the manifest's input hashes left out (an object store's
    inputs are not hashed: the driver does not read them)."""
    manifest = json.loads(files["manifest.json"])
    for entry in manifest["inputs"]:
        entry.pop("sha256")
    return {**files, "manifest.json": json.dumps(manifest, sort_keys=True).encode()}


def make_chats(root: Path) -> Chats:
    """The chats, uploaded to s3://BUCKET/chats (the bucket made here), and the local run."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folder = root / "inputs"
    folder.mkdir()
    lines = synth.write_mixed(root / "a", 160, seed=8, turns=2, scale=0.05).read_bytes().splitlines(keepends=True)
    (folder / "a.jsonl").write_bytes(b"".join(b"{oops\n" + line if i % 37 == 0 else line for i, line in enumerate(lines)))
    text = synth.write_mixed(root / "b", 80, seed=9, turns=2, scale=0.05).read_bytes()
    (folder / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
    records = [json.loads(line) for line in synth.write_mixed(root / "c", 80, seed=10, turns=2, scale=0.05).read_bytes().splitlines()]
    table = pa.table({
        "id": [record.get("id") for record in records],
        "messages": [json.dumps(record["messages"]) for record in records],
        "tools": [json.dumps(record["tools"]) if "tools" in record else None for record in records],
    })
    pq.write_table(table, folder / "c.parquet", row_group_size=16)
    client = s3_client()
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(folder.iterdir()):
        client.upload_file(str(path), BUCKET, f"chats/{path.name}")
    out = root / "local"
    convert(sorted(folder.iterdir()), out, options())
    expected = folder_files(out)
    assert len([name for name in expected if name.startswith("part-")]) >= 8
    assert expected["rejected.jsonl"].count(b"\n") >= 4
    return Chats(folder, f"s3://{BUCKET}/chats", expected)
