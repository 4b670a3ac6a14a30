"""The exactness contract of docs/FORMAT.md, checked against N-pass samples rendered
straight with `apply_chat_template`: symbolically (every trained (context, target) pair
exactly once) and numerically (a real model's per-token losses)."""

import json
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TEMPLATES, reference_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import dense_mask, n_pass_pairs, n_pass_samples, one_pass_pairs
from transformers import Qwen3Config, Qwen3ForCausalLM
from typer.testing import CliRunner

from onepass_prep.cli import app
from onepass_prep.pack import join
from onepass_prep.records import Conversation, parse_line, read_jsonl
from onepass_prep.render import Renderer
from onepass_prep.tokenizer import load_tokenizer
from onepass_prep.work import layout_conversation

THINK = ("<think>", "</think>")


def convert_sample(sample_path, out, *extra):
    result = CliRunner().invoke(
        app, ["convert", str(sample_path), "--model", "qwen", "-o", str(out), *extra]
    )
    assert result.exit_code == 0, result.output
    return pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()


def reference_pairs(path, template):
    renderer = Renderer(load_tokenizer("qwen", template and template.read_text()).tokenizer, THINK)
    tokenizer = reference_tokenizer(template)
    pairs, tokens = None, 0
    for record in read_jsonl(path, THINK):
        assert isinstance(record, Conversation), record
        samples = n_pass_samples(
            renderer.template_messages(record.messages), record.tools, tokenizer
        )
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
        renderer = Renderer(load_tokenizer("qwen", template_path and template_path.read_text()).tokenizer, THINK)
        last = [renderer.samples(c)[-1].input_ids for c in read_jsonl(sample_path, THINK)]
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
    line = json.dumps({"messages": messages, "tools": tools or None}, ensure_ascii=False)
    conversation = parse_line(line.encode(), "generated", 1, THINK)
    assert isinstance(conversation, Conversation), conversation
    return conversation


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
@given(conversation=conversations())
def test_generated_conversations_are_exact(template, conversation):
    loaded, reference = cached_tokenizers(template)
    renderer = Renderer(loaded.tokenizer, THINK)
    layout = layout_conversation(conversation, renderer, max_seq_len=10**9)
    row = join([("generated", layout)])
    row_dict = {
        "input_ids": row.input_ids,
        "labels": row.labels,
        "position_ids": row.position_ids,
        "mask_spec": {"seg_lens": row.seg_lens, "seg_parents": row.seg_parents},
    }
    samples = n_pass_samples(
        renderer.template_messages(conversation.messages), conversation.tools, reference
    )
    assert one_pass_pairs(row_dict) == n_pass_pairs(samples)


_tokenizers = {}


def cached_tokenizers(template):
    """(the converter's tokenizer, the reference AutoTokenizer) for a template."""
    if template not in _tokenizers:
        path = TEMPLATES / template if template else None
        _tokenizers[template] = (load_tokenizer("qwen", path and path.read_text()), reference_tokenizer(path))
    return _tokenizers[template]


def tiny_qwen3():
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=8192,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    return Qwen3ForCausalLM(config).eval()


def token_losses(model, ids, positions, mask, targets_at):
    """Loss of predicting ids[j] from position j - 1, for each j in `targets_at`."""
    ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)[None]
    kwargs = {"position_ids": torch.as_tensor(np.asarray(positions), dtype=torch.long)[None]}
    if mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(mask)[None, None]
    hidden = model.model(input_ids=ids_t, **kwargs).last_hidden_state[0]
    targets_at = torch.as_tensor(targets_at, dtype=torch.long)
    logits = model.lm_head(hidden[targets_at - 1])
    return torch.nn.functional.cross_entropy(logits, ids_t[0, targets_at], reduction="none")


def test_one_pass_losses_equal_n_pass_losses(tmp_path, sample_path, qwen):
    reference = reference_tokenizer()
    """Tiny random Qwen3, float32, sdpa: per-token losses match N separate passes."""
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(sample_path.read_text(encoding="utf-8").splitlines(True)[:8]))
    rows = convert_sample(subset, tmp_path / "out", "--max-seq-len", "4096")
    model = tiny_qwen3()
    renderer = Renderer(qwen.tokenizer, THINK)
    expected = defaultdict(list)
    with torch.no_grad():
        for record in read_jsonl(subset, THINK):
            for ids, start in n_pass_samples(
                renderer.template_messages(record.messages), record.tools, reference
            ):
                at = list(range(start, len(ids)))
                for j, loss in zip(at, token_losses(model, ids, range(len(ids)), None, at), strict=True):
                    expected[(tuple(ids[:j]), ids[j])].append(loss.item())
        got = defaultdict(list)
        for row in rows:
            spec = row["mask_spec"]
            mask = dense_mask(spec["seg_lens"], spec["seg_parents"])
            labels = np.asarray(row["labels"])
            at = np.flatnonzero(labels != -100)
            losses = token_losses(model, row["input_ids"], row["position_ids"], mask, at)
            ids = row["input_ids"]
            for j, loss in zip(at, losses, strict=True):
                context = tuple(np.asarray(ids)[mask[j - 1]].tolist())
                got[(context, ids[j])].append(loss.item())
    assert got.keys() == expected.keys()
    for key, losses in expected.items():
        np.testing.assert_allclose(sorted(got[key]), sorted(losses), rtol=0, atol=1e-5)
