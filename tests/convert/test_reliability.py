"""Dirty input, interruptions and reproducibility: nothing lost silently, nothing
half-written taken for finished, the same bytes every time."""

import json
import signal
import sys
import time

import synth
from helpers.paths import ROOT, TEMPLATES
from helpers.processes import Bounded, run_bounded
from helpers.reference import (
    READS,
    contract_samples,
    n_pass_pairs,
    one_pass_pairs,
    reference_tokenizer,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from onepass_prep.cli import app
from onepass_prep.convert.pack import join
from onepass_prep.convert.records import Rejection
from onepass_prep.convert.render import Renderer
from onepass_prep.convert.work import Converted, Rules, convert_lines

THINK = ("<think>", "</think>")
runner = CliRunner()
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>x</think>ok"}]}


def line(record) -> bytes:
    return record if isinstance(record, bytes) else json.dumps(record, ensure_ascii=False).encode()


BAD_LINES = [
    (b"{oops", "invalid-json"),
    (b'"just a string"', "not-an-object"),
    (line({"prompt": "x"}), "no-messages"),
    (line({"messages": {"role": "user"}}), "bad-messages"),
    (line({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}), "unknown-role"),
    (line({"messages": [{"role": "user", "content": "only a question"}]}), "no-assistant"),
    (line({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}), "non-string-content"),
    (line({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>open"}]}), "bad-think-tags"),
    (line({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>a</think>b</think>"}]}), "bad-think-tags"),
    (line({"messages": [{"role": "user", "content": "REFUSE"}, {"role": "assistant", "content": "y"}]}), "template-error"),
    (line({"messages": [{"role": "user", "content": "long " * 400}, {"role": "assistant", "content": "y"}]}), "too-long"),
    (b"\xc3\x28 not utf-8", "not-utf8"),
]


def test_bad_records_are_rejected_with_file_line_and_reason(tmp_path):
    data = tmp_path / "dirty.jsonl"
    lines = []
    for bad, _ in BAD_LINES:
        lines += [line(GOOD), bad, b""]  # an empty line is skipped, not an error
    data.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    result = runner.invoke(app, [
        "convert", str(data), "--model", "qwen", "-o", str(out),
        "--chat-template", str(TEMPLATES / "raises.jinja"), "--max-seq-len", "300",
    ])
    assert result.exit_code == 0, result.output
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["kind"] for r in rejected] == [kind for _, kind in BAD_LINES]
    assert [r["line"] for r in rejected] == [3 * i + 2 for i in range(len(BAD_LINES))]
    assert all(r["source"] == data.name and r["reason"] for r in rejected)
    assert rejected[0]["raw"] == "{oops"
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["read"] == 2 * len(BAD_LINES) == counts["written"] + counts["rejected"]
    assert counts["rejected"] == len(BAD_LINES)
    assert sum(counts["rejected_by_kind"].values()) == len(BAD_LINES)
    assert "rejected" in result.output


def test_strict_stops_at_the_first_bad_record(tmp_path):
    data = tmp_path / "dirty.jsonl"
    data.write_bytes(line(GOOD) + b"\n" + b"{oops\n" + line(GOOD) + b"\n")
    result = runner.invoke(app, ["convert", str(data), "--model", "qwen", "-o", str(tmp_path / "o"), "--strict"])
    assert result.exit_code == 3
    assert f"{data}:2: invalid JSON" in result.output
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_a_run_begun_by_an_earlier_format_is_not_resumed(tmp_path):
    """A run that stopped (here at a bad record, --strict) after a shard was written, by a
    converter of format v3 (its progress names no format version): resuming it would add
    v4 shards to v3 ones under a v4 manifest, so it is refused."""
    data = tmp_path / "dirty.jsonl"
    data.write_bytes(line(GOOD) + b"\n" + b"{oops\n")
    out = tmp_path / "o"
    args = ["convert", str(data), "--model", "qwen", "-o", str(out), "--strict", "--records-per-shard", "1"]
    assert runner.invoke(app, args).exit_code == 3
    progress = out / ".progress.jsonl"
    lines = progress.read_text().splitlines(keepends=True)
    begun = json.loads(lines[0])
    assert begun["fingerprint"].pop("format_version") == 4
    progress.write_text(json.dumps(begun) + "\n" + "".join(lines[1:]))
    resumed = runner.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 1 and "format_version changed since the run began" in resumed.output


def test_a_finished_folder_is_refused_without_overwrite_or_resume(tmp_path, sample_path):
    out = tmp_path / "o"
    assert runner.invoke(app, ["convert", str(sample_path), "--model", "qwen", "-o", str(out)]).exit_code == 0
    again = runner.invoke(app, ["convert", str(sample_path), "--model", "qwen", "-o", str(out)])
    assert again.exit_code == 1 and "--resume" in again.output
    resumed = runner.invoke(app, ["convert", str(sample_path), "--model", "qwen", "-o", str(out), "--resume"])
    assert resumed.exit_code == 1 and "nothing to resume" in resumed.output
    (tmp_path / "mine.txt").write_text("x")
    foreign = runner.invoke(app, ["convert", str(sample_path), "--model", "qwen", "-o", str(tmp_path), "--overwrite"])
    assert foreign.exit_code == 1 and "did not write" in foreign.output


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def convert_command(data, out, *extra):
    return [sys.executable, "-m", "onepass_prep.cli", "convert", str(data), "--model", "qwen",
            "-o", str(out), "--records-per-shard", "25", "--max-seq-len", "4096", *extra]


def interrupt_after_shards(command, shards, sig, out):
    with Bounded(command, 300, cwd=ROOT) as child:
        while len(list(out.glob("part-*.parquet"))) < shards:
            assert child.process.poll() is None, "finished before it could be interrupted"
            child.check_time()
            time.sleep(0.02)
        child.process.send_signal(sig)
        child.communicate()
    return child.process.returncode


def test_interrupted_run_resumes_to_identical_bytes(tmp_path):
    # Half the records share prefixes (synth.write_mixed): merged trees are written and resumed.
    data = synth.write_mixed(tmp_path / "big.jsonl", 2500, seed=5, turns=2, scale=0.08)
    # Rejections all along the file, so that some are written after the last point an
    # interrupted run saved: resuming must drop those, not write them twice.
    lines = data.read_bytes().splitlines(keepends=True)
    data.write_bytes(b"".join(b"{oops\n" + chunk if i % 97 == 0 else chunk for i, chunk in enumerate(lines)))
    whole = tmp_path / "whole"
    assert run_bounded(convert_command(data, whole), 300, cwd=ROOT).returncode == 0

    cut = tmp_path / "cut"
    assert interrupt_after_shards(convert_command(data, cut), 3, signal.SIGINT, cut) == 130
    assert not (cut / "manifest.json").exists()  # nothing looks finished
    assert interrupt_after_shards(convert_command(data, cut, "--resume"), 6, signal.SIGKILL, cut) == -9
    assert not (cut / "manifest.json").exists()
    finished = run_bounded(convert_command(data, cut, "--resume"), 300, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr

    assert folder_bytes(cut) == folder_bytes(whole)  # the manifest too
    tokens = json.loads((whole / "manifest.json").read_text())["tokens"]
    assert tokens["one_pass"] < 0.9 * tokens["unshared"]  # conversations did share trees


def test_num_proc_gives_the_same_bytes(tmp_path, sample_path):
    mixed = synth.write_mixed(tmp_path / "mixed.jsonl", 60, seed=2, turns=2, scale=0.08)
    for data, per_shard in ((sample_path, "5"), (mixed, "12")):  # without and with shared prefixes
        outs = []
        for num_proc in ("1", "2"):
            out = tmp_path / f"{data.stem}-{num_proc}"
            result = runner.invoke(app, ["convert", str(data), "--model", "qwen", "-o", str(out), "--num-proc",
                                         num_proc, "--records-per-shard", per_shard, "--max-seq-len", "4096"])
            assert result.exit_code == 0, result.output
            outs.append(folder_bytes(out))
        assert outs[0] == outs[1] and len(outs[0]) > 3
    tokens = json.loads(outs[0]["manifest.json"])["tokens"]
    assert tokens["one_pass"] < 0.9 * tokens["unshared"]


# Fuzzing: whatever the records hold, each is converted exactly or rejected with a reason.
weird_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "<think>", "</think>", "<think></think>", "<think><think>x</think>", "a</think>b",
                     "<|im_start|>", "<|im_end|>", "<tool_call>", "\n\n", "数学 🙂", "é\u0301"]),
    st.text(alphabet="ab <>/thinkx\n", max_size=3000),  # huge turns, tag fragments
).map(str)
json_value = st.one_of(weird_text, st.integers(), st.none(), st.lists(st.integers(), max_size=2))
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "wizard"]), "content": json_value},
    optional={"reasoning_content": json_value},
)
plausible_turns = st.lists(
    st.tuples(weird_text, st.one_of(st.none(), weird_text), weird_text), min_size=1, max_size=5
).map(lambda turns: [
    m for user, reasoning, answer in turns for m in (
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer, **({"reasoning_content": reasoning} if reasoning is not None else {})},
    )
])
well_formed = st.fixed_dictionaries({"messages": plausible_turns})
records = st.one_of(
    well_formed, well_formed, well_formed,  # mostly well-formed, with weird text
    st.fixed_dictionaries({"messages": st.lists(message, max_size=8)}),
    st.fixed_dictionaries({"conversations": st.lists(
        st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "bard"]), "value": json_value}),
        max_size=8)}),
    json_value,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(records, min_size=1, max_size=4))
def test_fuzzed_records_convert_exactly_or_are_rejected(qwen, batch):
    renderer = fuzz_renderer(qwen)  # one for all examples, as for all records of a run
    lines = [("fuzz.jsonl", n, json.dumps(r, ensure_ascii=False).encode()) for n, r in enumerate(batch, 1)]
    results = convert_lines(lines, renderer, Rules(THINK, 8192))
    assert [r.line for r in results] == [n for n, _ in enumerate(batch, 1)]
    for result in results:
        if isinstance(result, Rejection):
            assert result.reason and result.kind
            continue
        assert isinstance(result, Converted)
        record = batch[result.line - 1]
        samples = contract_samples(record, fuzz_reference(), READS[None])
        row = join([(result.id, result.layout)])
        spec = {"seg_lens": row.seg_lens, "seg_parents": row.seg_parents}
        got = one_pass_pairs({"input_ids": row.input_ids, "labels": row.labels,
                              "position_ids": row.position_ids, "mask_spec": spec})
        assert got == n_pass_pairs(samples), record


_reference = []
_renderer: list[Renderer] = []


def fuzz_renderer(qwen) -> Renderer:
    """Made once: building a Renderer's piece encoder takes about a second."""
    if not _renderer:
        _renderer.append(Renderer(qwen.tokenizer, THINK))
    return _renderer[0]


def fuzz_reference():
    if not _reference:
        _reference.append(reference_tokenizer())
    return _reference[0]


def test_rejected_file_is_valid_jsonl_for_binary_garbage(tmp_path):
    data = tmp_path / "garbage.jsonl"
    data.write_bytes(bytes(b for b in range(256) if b != 10) + b"\n" + line(GOOD) + b"\n")
    out = tmp_path / "o"
    assert runner.invoke(app, ["convert", str(data), "--model", "qwen", "-o", str(out)]).exit_code == 0
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rejected) == 1 and rejected[0]["kind"] in {"not-utf8", "invalid-json"}


def test_readers_name_the_file_of_a_truncated_or_corrupt_shard(tmp_path, sample_path):
    from onepass_prep.torch import FormatError, OnePassDataset, OnePassIterableDataset

    good = tmp_path / "good"
    assert runner.invoke(app, ["convert", str(sample_path), "--model", "qwen", "-o", str(good),
                               "--no-pack"]).exit_code == 0
    shard_bytes = (good / "part-00000.parquet").read_bytes()
    truncated, corrupt = tmp_path / "truncated", tmp_path / "corrupt"
    for folder, data in ((truncated, shard_bytes[: len(shard_bytes) // 2]),
                         (corrupt, bytes(b ^ 0xFF if 200 <= i < 5000 and i % 7 == 0 else b
                                         for i, b in enumerate(shard_bytes)))):
        folder.mkdir()
        (folder / "manifest.json").write_bytes((good / "manifest.json").read_bytes())
        (folder / "part-00000.parquet").write_bytes(data)
        shard = str(folder / "part-00000.parquet")
        for read in (lambda f=folder: OnePassDataset(f, cache_dir=tmp_path / "cache"),
                     lambda f=folder: list(OnePassIterableDataset(f))):
            try:
                read()
            except FormatError as error:
                assert str(error).startswith(shard), error
            else:
                raise AssertionError(f"{folder.name}: read without an error")
        for command in (["inspect", str(folder)], ["stats", str(folder)],
                        ["verify", str(folder), "--input", str(sample_path)]):
            result = runner.invoke(app, command)
            # rich wraps long paths across lines; the path itself has no spaces
            assert result.exit_code == 1 and shard in "".join(result.output.split()), result.output
