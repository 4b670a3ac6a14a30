"""The exactness contract of docs/FORMAT.md, checked against N-pass samples rendered
straight with `apply_chat_template`: symbolically (every trained (context, target) pair
exactly once) and numerically (a real model's per-token losses)."""

import json

import pyarrow.parquet as pq
import pytest
from helpers.paths import TEMPLATES
from helpers.reference import (
    READS,
    assert_losses_match,
    contract_samples,
    n_pass_pairs,
    one_pass_pairs,
    reference_tokenizer,
    tiny_qwen3,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from onepass_prep.cli import app
from onepass_prep.convert.pack import join
from onepass_prep.convert.records import Conversation, parse_line
from onepass_prep.convert.render import Renderer
from onepass_prep.convert.tokenizer import load_tokenizer
from onepass_prep.convert.work import Rules, layout_conversation

THINK = ("<think>", "</think>")


def convert_sample(sample_path, out, *extra):
    result = CliRunner().invoke(
        app, ["convert", str(sample_path), "--model", "qwen", "-o", str(out), *extra]
    )
    assert result.exit_code == 0, result.output
    return pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()


def reference_pairs(path, template):
    tokenizer = reference_tokenizer(template)
    reads = READS[template and template.name]
    pairs, tokens = None, 0
    for line in path.read_text(encoding="utf-8").splitlines():
        samples = contract_samples(json.loads(line), tokenizer, reads)
        tokens += sum(len(ids) for ids, _ in samples)
        pairs = n_pass_pairs(samples) if pairs is None else pairs + n_pass_pairs(samples)
    return pairs, tokens


def rows_pairs(rows):
    pairs = None
    for row in rows:
        row_pairs = one_pass_pairs(row)
        pairs = row_pairs if pairs is None else pairs + row_pairs
    return pairs


@pytest.mark.parametrize(
    "template", [None, "strip_history.jinja", "keep_reasoning.jinja"], ids=["qwen3", "strip", "keep"]
)
def test_sample_data_is_exact(tmp_path, sample_path, template):
    extra = ["--chat-template", str(TEMPLATES / template)] if template else []
    rows = convert_sample(sample_path, tmp_path / "out", *extra)
    template_path = TEMPLATES / template if template else None
    expected, n_pass_tokens = reference_pairs(sample_path, template_path)
    assert rows_pairs(rows) == expected
    assert sum(row["n_pass_tokens"] for row in rows) == n_pass_tokens
    assert sum(row["num_trained_tokens"] for row in rows) == sum(expected.values())
    one_pass_tokens = sum(row["num_tokens"] for row in rows)
    if template == "keep_reasoning.jinja":
        # Every sample extends the previous one: the row is the last sample, nothing more.
        tokenizer, reads = reference_tokenizer(template_path), READS[template]
        lines = sample_path.read_text(encoding="utf-8").splitlines()
        last = [contract_samples(json.loads(line), tokenizer, reads)[-1][0] for line in lines]
        assert one_pass_tokens == sum(len(ids) for ids in last)
    else:
        assert one_pass_tokens < n_pass_tokens


unicode_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30
).filter(lambda text: "think>" not in text)


@st.composite
def conversations(draw):
    messages, tools = [], []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(unicode_text)})
    for turn in range(draw(st.integers(1, 8))):
        messages.append({"role": "user", "content": draw(unicode_text)})
        for call in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
            name = f"tool_{turn}_{call}"
            tools.append({"type": "function", "function": {"name": name, "parameters": {}}})
            message = assistant(draw, "")
            message["tool_calls"] = [
                {"type": "function", "function": {"name": name, "arguments": {"q": draw(unicode_text)}}}
            ]
            messages += [message, {"role": "tool", "content": draw(unicode_text)}]
        messages.append(assistant(draw, draw(unicode_text)))
    return {"messages": messages, "tools": tools or None}


def assistant(draw, content):
    style = draw(st.sampled_from(["none", "empty", "field", "inline"]))
    reasoning = draw(unicode_text)
    if style == "field":
        return {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if style == "empty":
        return {"role": "assistant", "content": content, "reasoning_content": ""}
    if style == "inline":
        return {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{content}"}
    return {"role": "assistant", "content": content}


@pytest.mark.parametrize("template", [None, "strip_history.jinja"], ids=["qwen3", "strip"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=conversations())
def test_generated_conversations_are_exact(template, record):
    renderer, reference = cached_tokenizers(template)
    conversation = parse_line(json.dumps(record).encode(), "generated", 1, THINK)
    assert isinstance(conversation, Conversation), conversation
    layout = layout_conversation(conversation, renderer, Rules(THINK, 10**9))
    row = join([("generated", layout)])
    row_dict = {
        "input_ids": row.input_ids,
        "labels": row.labels,
        "position_ids": row.position_ids,
        "mask_spec": {"seg_lens": row.seg_lens, "seg_parents": row.seg_parents},
    }
    samples = contract_samples(record, reference, READS[template])
    assert one_pass_pairs(row_dict) == n_pass_pairs(samples)


_tokenizers = {}


def cached_tokenizers(template):
    """(the converter's renderer, the reference AutoTokenizer) for a template, made once: a
    Renderer takes about a second to build its piece encoder, as in one run."""
    if template not in _tokenizers:
        path = TEMPLATES / template if template else None
        loaded = load_tokenizer("qwen", path and path.read_text())
        _tokenizers[template] = (Renderer(loaded.tokenizer, THINK), reference_tokenizer(path))
    return _tokenizers[template]


def test_one_pass_losses_equal_n_pass_losses(tmp_path, sample_path):
    """Tiny random Qwen3, float32, sdpa: per-token losses match N separate passes."""
    reference = reference_tokenizer()
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(sample_path.read_text(encoding="utf-8").splitlines(True)[:8]))
    rows = convert_sample(subset, tmp_path / "out", "--max-seq-len", "4096")
    samples = [
        sample
        for line in subset.read_text(encoding="utf-8").splitlines()
        for sample in contract_samples(json.loads(line), reference, READS[None])
    ]
    assert_losses_match(tiny_qwen3(), rows, samples)
