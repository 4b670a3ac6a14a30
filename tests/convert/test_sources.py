"""Input sources: every kind of input yields records that parse to the same conversations
as the same records given as JSONL, resumes at the right record, and is recognised by
what it holds, not by its name. The Parquet and Arrow files are written by `datasets`
itself, the compressed ones by gzip and zstandard."""

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tracemalloc
import zipfile

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from helpers.paths import ROOT, SAMPLE

from onepass_prep.convert import sources
from onepass_prep.convert.records import Conversation, Rejection, parse_line
from onepass_prep.convert.sources import SourceError, arrow_row, open_source, python_source

THINK = ("<think>", "</think>")
LINES = SAMPLE.read_bytes().splitlines(keepends=True)
RECORDS = [json.loads(line) for line in LINES]
# Parquet and Arrow hold one shape per file (`Dataset.from_list` takes its columns from
# the first record), so those cases are split by shape.
SHAPES = {
    "openai": [r for r in RECORDS if "messages" in r and "tools" not in r],
    "tools": [r for r in RECORDS if "tools" in r],
    "sharegpt": [r for r in RECORDS if "conversations" in r],
}
NAME = "chats"


@pytest.fixture(autouse=True)
def _quiet_datasets():
    datasets.disable_progress_bars()


def parsed(source, start=1) -> list[Conversation | Rejection]:
    results = [parse_line(raw, NAME, number, THINK) for number, raw in source.records(start)]
    return [result for result in results if result is not None]


def as_jsonl(records) -> list[Conversation | Rejection]:
    """What the same records give as lines 1, 2, ... of a JSONL file."""
    lines = [json.dumps(record, ensure_ascii=False).encode() + b"\n" for record in records]
    return [parse_line(line, NAME, number, THINK) for number, line in enumerate(lines, start=1)]


def resumes(source) -> None:
    """From every record on, `records(start)` gives the tail of `records()`."""
    everything = list(source.records())
    for start in range(1, len(everything) + 2):
        assert list(source.records(start)) == everything[start - 1 :], start


def test_plain_jsonl_is_read_line_by_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_bytes(b"\n".join(line.rstrip(b"\n") for line in LINES[:3]) + b"\n\n" + LINES[3])
    source = open_source(path, NAME)
    assert (source.name, source.kind, source.resumable) == (NAME, "jsonl", True)
    records = list(source.records())
    assert [number for number, _ in records] == [1, 2, 3, 4, 5]  # the blank line 4 too
    assert b"".join(raw for _, raw in records) == path.read_bytes()
    assert source.size == source.file_bytes == path.stat().st_size  # progress in raw bytes
    assert source.fingerprint() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [c.line for c in parsed(source)] == [1, 2, 3, 5]
    resumes(source)
    passed_over = []  # what a resumed run counts as done, for its progress
    assert [number for number, _ in source.records(4, passed_over.append)] == [4, 5]
    assert passed_over == [len(raw) for _, raw in records[:3]]


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_jsonl(tmp_path, compression):
    """Two members or frames, as `cat a.gz b.gz` or a parallel compressor makes them."""
    data, cut = b"".join(LINES), sum(map(len, LINES[:10]))
    if compression == "gzip":
        packed = gzip.compress(data[:cut]) + gzip.compress(data[cut:])
    else:
        packed = zstandard.ZstdCompressor().compress(data[:cut]) + zstandard.ZstdCompressor().compress(data[cut:])
    path = tmp_path / "chats.txt"  # named for neither: the content says what it is
    path.write_bytes(packed)
    source = open_source(path, NAME)
    assert source.kind == {"gzip": "jsonl.gz", "zstd": "jsonl.zst"}[compression]
    assert parsed(source) == as_jsonl(RECORDS)
    assert source.size is None  # the raw lines are not the file's bytes
    assert source.fingerprint() == hashlib.sha256(packed).hexdigest()
    resumes(source)


def test_truncated_gzip_fails_naming_the_input_after_the_records_it_holds(tmp_path):
    path = tmp_path / "chats.jsonl.gz"
    path.write_bytes(gzip.compress(b"".join(LINES))[:-200])
    records = []
    with pytest.raises(SourceError, match=r"input chats: cannot read its jsonl.gz data after record \d+"):
        records.extend(open_source(path, NAME).records())
    assert records and all(raw == LINES[number - 1] for number, raw in records)


@pytest.mark.parametrize("indent", [None, 2])
def test_json_array(tmp_path, indent):
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(RECORDS, indent=indent, ensure_ascii=False), encoding="utf-8")
    source = open_source(path, NAME)
    assert source.kind == "json"
    assert parsed(source) == as_jsonl(RECORDS)
    assert [json.loads(raw) for _, raw in source.records()] == RECORDS
    resumes(source)


def test_json_array_is_cut_the_same_whatever_the_read_chunk(tmp_path, monkeypatch):
    """Strings holding brackets, quotes and backslashes, a byte order mark, and reads
    that end anywhere, inside a string or an escape."""
    brackets = 'a ] } [ { "quoted\\" \\\\'  # ends in an escaped backslash, as does the next
    tricky = [
        {"messages": [{"role": "user", "content": brackets}, {"role": "assistant", "content": "\\"}]},
        {"messages": [{"role": "user", "content": "\u00e9\u4e2d\U0001f600\\u0041"}]},
        {"id": 3}, "text", 12.5, None, [],
        *RECORDS[:5],
    ]
    path = tmp_path / "chats.json"
    path.write_bytes(b"\xef\xbb\xbf \n" + json.dumps(tricky, indent=1, ensure_ascii=False).encode() + b"\n")
    cuts = []
    for chunk in (1, 2, 3, 7, 1 << 20):
        monkeypatch.setattr(sources, "CHUNK", chunk)
        got = list(open_source(path, NAME).records())
        assert [number for number, _ in got] == list(range(1, len(tricky) + 1))
        assert [json.loads(raw) for _, raw in got] == tricky, chunk
        cuts.append(got)
    assert all(cut == cuts[0] for cut in cuts)
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps(tricky, ensure_ascii=False), encoding="utf-8")
    assert [raw.decode() for _, raw in open_source(compact).records()] == [
        json.dumps(item, ensure_ascii=False) for item in tricky
    ]  # each record's bytes as written


def test_a_bad_element_of_an_array_is_one_rejection_with_its_number(tmp_path):
    good = json.dumps(RECORDS[0])
    path = tmp_path / "chats.json"
    path.write_text(f'[{good}, {{"messages": tru}}, 5, {good}]', encoding="utf-8")
    results = parsed(open_source(path, NAME))
    assert [(r.line, r.kind if isinstance(r, Rejection) else "ok") for r in results] == [
        (1, "ok"), (2, "invalid-json"), (3, "not-an-object"), (4, "ok")
    ]
    assert results[1].raw == '{"messages": tru}'


@pytest.mark.parametrize(
    "text, reason",
    [
        ('[{"a": 1} {"b": 2}]', r"expected ',' or ']' after an element \(byte 10\)"),
        ('[{"a": 1}, {"b": "never ends}]', r"a string that never ends \(byte 17\)"),
        ('[{"a": 1}, {"b": [1, 2}', r"an element that never ends \(byte 11\)"),
        ('[{"a": 1},]', r"expected an element after ',' \(byte 10\)"),
        ('[{"a": 1}] x', r"text after the closing '\]' \(byte 11\)"),
        ('[{"a": 1}', r"expected ',' or '\]' after an element \(byte 9\)"),
    ],
)
def test_a_broken_array_fails_with_the_byte_offset(tmp_path, text, reason):
    path = tmp_path / "chats.json"
    path.write_text(text, encoding="utf-8")
    records = []
    with pytest.raises(SourceError, match=r"^input chats: cannot read its json data after record 1: not a well-formed JSON array: " + reason):
        records.extend(open_source(path, NAME).records())
    assert records == [(1, b'{"a": 1}')]


def test_a_json_array_streams_in_flat_memory(tmp_path, monkeypatch):
    """Memory is one record and one read chunk, not the file."""
    monkeypatch.setattr(sources, "CHUNK", 16 << 10)
    path = tmp_path / "big.json.gz"
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as handle:
        handle.write("[" + ",".join(json.dumps(RECORDS[i % len(RECORDS)]) for i in range(800)) + "]")
    source = open_source(path, NAME)
    assert source.kind == "json.gz"
    tracemalloc.start()
    try:
        count = sum(1 for _ in source.records())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 800
    assert peak < 200 << 10, peak  # the decompressed array is 1.4 MB


@pytest.mark.parametrize("shape", SHAPES)
def test_parquet_and_save_to_disk_written_by_datasets(tmp_path, shape):
    """List-of-struct columns give every message every key (null where absent): the
    records still parse to the same conversations as their JSONL lines."""
    dataset = datasets.Dataset.from_list(SHAPES[shape])
    dataset.to_parquet(str(tmp_path / "chats.parquet"), batch_size=3)  # row groups of 3 rows
    dataset.save_to_disk(str(tmp_path / "saved"), max_shard_size=4000)  # several .arrow files
    expected = as_jsonl(SHAPES[shape])
    for path, kind in (("chats.parquet", "parquet"), ("saved", "save_to_disk")):
        source = open_source(tmp_path / path, NAME)
        assert source.kind == kind
        assert parsed(source) == expected, kind
        assert source.count() == len(expected)
        resumes(source)
    assert len(open_source(tmp_path / "saved").files) > 1
    assert pq.ParquetFile(tmp_path / "chats.parquet").num_row_groups > 1


def test_save_to_disk_is_read_in_the_order_its_state_lists(tmp_path):
    datasets.Dataset.from_list(SHAPES["openai"]).save_to_disk(str(tmp_path), num_shards=3)
    state = json.loads((tmp_path / "state.json").read_text())
    state["_data_files"].reverse()
    (tmp_path / "state.json").write_text(json.dumps(state))
    source = open_source(tmp_path, NAME)
    assert [path.name for path in source.files] == [entry["filename"] for entry in state["_data_files"]]
    expected = [
        record for file in source.files for record in datasets.Dataset.from_file(str(file)).to_list()
    ]
    assert [json.loads(raw)["id"] for _, raw in source.records()] == [record["id"] for record in expected]


def test_a_folder_of_parquet_files_is_read_by_name_across_subfolders(tmp_path):
    """The hub's layout, data/train-0000i-of-0000n.parquet, and rows numbered across files."""
    dataset = datasets.Dataset.from_list(SHAPES["openai"])
    (tmp_path / "data").mkdir()
    for index in (2, 0, 1):  # written out of order
        part = dataset.shard(3, index, contiguous=True)
        part.to_parquet(str(tmp_path / "data" / f"train-{index:05d}-of-00003.parquet"), batch_size=4)
    (tmp_path / "README.md").write_text("a dataset card")
    (tmp_path / ".cache" / "huggingface").mkdir(parents=True)  # what a hub download leaves
    (tmp_path / ".cache" / "huggingface" / "x.parquet").write_bytes(b"not read")
    source = open_source(tmp_path, NAME)
    assert source.kind == "parquet-folder"
    assert [path.name for path in source.files] == [f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    assert parsed(source) == as_jsonl(SHAPES["openai"])
    assert source.count() == len(SHAPES["openai"])
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in source.files)).hexdigest()
    assert source.fingerprint() == digest
    assert source.file_bytes == sum(path.size() for path in source.files)
    resumes(source)


def test_detection_by_content_not_by_name(tmp_path):
    datasets.Dataset.from_list(SHAPES["sharegpt"]).to_parquet(str(tmp_path / "chats.jsonl"))
    (tmp_path / "chats.parquet").write_bytes(b"".join(LINES))
    (tmp_path / "arrow.jsonl").write_bytes(b"")
    with pa.OSFile(str(tmp_path / "arrow.jsonl"), "wb") as sink, pa.ipc.new_file(
        sink, pa.Table.from_pylist(SHAPES["sharegpt"]).schema
    ) as writer:  # the Arrow file format, as pyarrow and polars write it
        writer.write_table(pa.Table.from_pylist(SHAPES["sharegpt"]))
    assert open_source(tmp_path / "chats.jsonl").kind == "parquet"
    assert open_source(tmp_path / "chats.parquet").kind == "jsonl"
    arrow = open_source(tmp_path / "arrow.jsonl", NAME)
    assert arrow.kind == "arrow"
    assert parsed(arrow) == as_jsonl(SHAPES["sharegpt"])
    resumes(arrow)


def test_null_keys_of_struct_columns_mean_nothing():
    """A struct gives every message every key; null and absent are the same to a chat."""
    record = {"id": "n", "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "r", "tool_call_id": "c"},
        {"role": "assistant", "reasoning_content": "think", "content": None},
    ]}
    keys = ["role", "content", "reasoning_content", "tool_calls", "tool_call_id", "weight"]
    row = {"id": "n", "messages": [{key: message.get(key) for key in keys} for message in record["messages"]], "tools": None}
    table = pa.Table.from_pylist([row])  # what Parquet holds: every key, nulls where absent
    assert table.to_pylist()[0]["messages"][0]["tool_calls"] is None
    from_table = parse_line(sources._dump(arrow_row(table.to_pylist()[0])), NAME, 1, THINK)
    absent = {**record, "messages": [{k: v for k, v in m.items() if v is not None} for m in record["messages"]]}
    assert from_table == as_jsonl([record])[0] == as_jsonl([absent])[0]


def test_tools_stored_as_json_text_are_read_as_written():
    """Columns whose shape varies from row to row are often saved as JSON text; such
    text keeps the tools' key order, which a struct column cannot (a template renders
    tools with `tojson`, so the order is in the tokens)."""
    record = SHAPES["tools"][1]
    text = {
        **record, "messages": json.dumps(record["messages"]), "tools": json.dumps(record["tools"]),
        "chat_template_kwargs": '{"enable_thinking": true}',
    }
    row = arrow_row(text)
    assert json.dumps(row["tools"]) == json.dumps(record["tools"])
    assert json.dumps(row["messages"]) == json.dumps(record["messages"])
    assert row["chat_template_kwargs"] == {"enable_thinking": True}
    assert arrow_row({"tools": "not json"})["tools"] == "not json"  # parse_line says why it is bad


def test_python_dicts_and_a_dataset():
    everything = as_jsonl(RECORDS)
    source = python_source(iter(RECORDS), NAME)
    assert (source.kind, source.resumable, source.fingerprint(), source.count()) == ("python", False, None, None)
    assert parsed(source) == everything
    assert python_source(RECORDS).name == "<python>"
    assert python_source(RECORDS).count() == len(RECORDS)
    assert parsed(python_source(RECORDS, NAME), start=5) == everything[4:]
    dataset = datasets.Dataset.from_list(SHAPES["tools"])
    source = python_source(dataset, NAME)
    assert (source.kind, source.resumable, source.count()) == ("dataset", False, len(dataset))
    assert parsed(source) == as_jsonl(SHAPES["tools"])
    assert parsed(source, start=3) == as_jsonl(SHAPES["tools"])[2:]
    shuffled = dataset.shuffle(seed=1).select(range(5))  # an indices mapping over the table
    by_id = {record["id"]: record for record in SHAPES["tools"]}
    assert parsed(python_source(shuffled, NAME)) == as_jsonl([by_id[i] for i in shuffled["id"]])


def test_an_iterable_dataset():
    """What `load_dataset(..., streaming=True)` gives (making one imports torch: slow)."""
    streamed = datasets.Dataset.from_list(SHAPES["tools"]).to_iterable_dataset()
    source = python_source(streamed, NAME)
    assert (source.kind, source.resumable, source.count()) == ("dataset", False, None)
    assert parsed(source) == as_jsonl(SHAPES["tools"])


def test_python_values_json_cannot_hold_become_rejections_not_crashes():
    items = [{"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "a"}]}, "text"]
    assert [r.kind for r in parsed(python_source(items, NAME))] == ["bad-unicode", "not-an-object"]


def test_standard_input(monkeypatch):
    class Stdin:
        buffer = io.BytesIO(b"".join(LINES))

    monkeypatch.setattr(sys, "stdin", Stdin)
    source = open_source("-")
    assert (source.name, source.kind, source.resumable, source.fingerprint()) == ("<stdin>", "stdin", False, None)
    assert [(c.source, c.line) for c in parsed(source)][:2] == [(NAME, 1), (NAME, 2)]


def test_standard_input_of_a_real_process_without_importing_datasets_or_torch():
    program = (
        "import sys, json\n"
        "from onepass_prep.convert.sources import open_source\n"
        "numbers = [n for n, _ in open_source('-').records()]\n"
        "print(json.dumps([numbers, [m for m in ('datasets', 'torch', 'zstandard') if m in sys.modules]]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], input=b"".join(LINES[:4]), capture_output=True, cwd=ROOT, check=True
    )
    assert json.loads(done.stdout) == [[1, 2, 3, 4], []]


def test_inputs_that_are_not_data_fail_in_one_line(tmp_path):
    def error(path) -> str:
        with pytest.raises(SourceError) as caught:
            open_source(path)
        return str(caught.value)

    with zipfile.ZipFile(tmp_path / "chats.jsonl", "w") as archive:
        archive.writestr("chats.jsonl", b"".join(LINES))
    assert error(tmp_path / "chats.jsonl") == f"input {tmp_path / 'chats.jsonl'}: looks like a zip archive; unpack it and pass the files inside"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.jsonl").write_bytes(LINES[0])
    assert error(tmp_path / "notes") == (
        f"input {tmp_path / 'notes'}: a folder, but neither a datasets.save_to_disk folder (no state.json) "
        "nor one with .parquet files (it holds: .jsonl)"
    )
    assert error(tmp_path / "missing.jsonl") == f"input {tmp_path / 'missing.jsonl'}: no such file or folder"
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(SHAPES["sharegpt"]), test=datasets.Dataset.from_list(SHAPES["sharegpt"])
    ).save_to_disk(str(tmp_path / "dict"))
    assert error(tmp_path / "dict").endswith(f"a datasets DatasetDict folder (splits: test, train); pass one split's folder, e.g. {tmp_path / 'dict' / 'test'}")
    (tmp_path / "hub").mkdir()
    for split in ("train", "test"):
        datasets.Dataset.from_list(SHAPES["sharegpt"]).to_parquet(str(tmp_path / "hub" / f"{split}-00000-of-00001.parquet"))
    assert "holds Parquet files of several splits (test, train)" in error(tmp_path / "hub")
    datasets.Dataset.from_list([{"text": "hello", "label": 1}]).to_parquet(str(tmp_path / "text.parquet"))
    assert error(tmp_path / "text.parquet").endswith("text.parquet has no 'messages' or 'conversations' column (its columns: text, label)")
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"\x1f\x8b" + b"\x00" * 20)
    assert error(bad).startswith(f"input {bad}: looks like gzip-compressed data, but cannot be read: ")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes((tmp_path / "text.parquet").read_bytes()[:-30])
    assert error(broken).startswith(f"input {broken}: broken.parquet looks like Parquet, but cannot be read: ")
    cut = tmp_path / "cut.arrow"
    cut.write_bytes(next((tmp_path / "dict" / "train").glob("*.arrow")).read_bytes()[:50])
    assert error(cut).startswith(f"input {cut}: cut.arrow looks like Arrow, but cannot be read: ")
    packed = tmp_path / "text.parquet.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "text.parquet").read_bytes()))
    assert error(packed) == f"input {packed}: zstd-compressed binary data, not JSON; decompress it first"
