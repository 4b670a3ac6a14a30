"""Real chat templates published with reasoning models (tests/templates/), each through
the whole pipeline: generated chats in every input form converted by the CLI into packed
rows, checked against an independent oracle of the input contract (tests/reference.py):
every trained pair exactly once, a tiny model's per-token losses, rejections exactly
where the template cannot render, and the audit of reasoning the template drops."""

import functools
import json
import random
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.paths import TEMPLATES
from helpers.reference import (
    READS,
    Refused,
    assert_losses_match,
    contract_reasoning,
    contract_samples,
    n_pass_pairs,
    one_pass_pairs,
    record_messages,
    reference_tokenizer,
    tiny_qwen3,
    weight_totals,
)
from helpers.runs import write_jsonl
from typer.testing import CliRunner

from onepass_prep.cli import app
from onepass_prep.convert.render import Renderer
from onepass_prep.convert.tokenizer import load_tokenizer

_FOLDER = tempfile.TemporaryDirectory(prefix="onepass-prep-templates-")  # removed at exit
# Template file -> the template kwargs its reasoning mode needs.
KWARGS = {
    "qwen3.jinja": {},
    "qwq-32b.jinja": {},
    "deepseek-r1-distill-qwen.jinja": {},
    "deepseek-v3.1.jinja": {"thinking": True},
    "gpt-oss.jinja": {},
    "glm-4.6.jinja": {},
    "smollm3.jinja": {},
    "strip_history.jinja": {},
    "prompt_not_prefix.jinja": {},
    "keep_reasoning.jinja": {},
    "raises.jinja": {},
    "kimi-k2-thinking.jinja": {},
    "field_after_first_answer.jinja": {},
}
# Templates that read the field only in some turns: the others train without it.
SOME_TURNS = ("kimi-k2-thinking.jinja", "field_after_first_answer.jinja")
TEXTS = ["Paris", "数学 🙂 é\u0301 naïve", "two\nlines", "  spaced out  ", "<b>tag-like</b> & co", "x" * 40]
STYLES = [
    "none", "compact", "spaced", "open-in-prompt", "empty-inline", "empty-field",
    "reasoning_content", "reasoning", "thinking", "parts", "REFUSE",
]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}


def assistant(rng: random.Random, style: str, answer: str) -> dict:
    reasoning = rng.choice(TEXTS)
    message = {"role": "assistant", "content": answer}
    if style == "compact":
        message["content"] = f"<think>{reasoning}</think>{answer}"
    elif style == "spaced":
        message["content"] = f"<think>\n{reasoning}\n</think>\n\n{answer}"
    elif style == "open-in-prompt":
        message["content"] = f"{reasoning}</think>\n\n{answer}"
    elif style == "empty-inline":
        message["content"] = f"<think>\n\n</think>\n\n{answer}"
    elif style == "empty-field":
        message["reasoning_content"] = ""
    elif style in ("reasoning_content", "reasoning", "thinking"):
        message[style] = reasoning
    elif style == "parts":
        cut = len(answer) // 2
        message["content"] = [
            {"type": "thinking", "thinking": reasoning},
            {"type": "text", "text": answer[:cut]}, {"type": "text", "text": answer[cut:]},
        ]
    elif style == "REFUSE":  # raises.jinja refuses it; the others render it as text
        message["content"] = f"{answer} REFUSE"
    return message


def generated_records(seed: int, count: int) -> list[dict]:
    """Chats that cover every input form: each reasoning style in every turn position,
    tool chains with null content (some with reasoning), system prompts, unicode."""
    rng = random.Random(seed)
    records = []
    for number in range(count):
        messages = [{"role": "system", "content": rng.choice(TEXTS)}] if number % 3 == 0 else []
        tools = None
        for turn in range(1 + number % 3):
            messages.append({"role": "user", "content": f"question {turn}: {rng.choice(TEXTS)}"})
            if (number + turn) % 4 == 1:
                tools = [WEATHER]
                arguments = {"city": rng.choice(TEXTS)}  # an object, or JSON text as OpenAI's API gives it
                call = {"role": "assistant", "content": None, "tool_calls": [{
                    "id": f"call_{turn}", "type": "function", "function": {
                        "name": "get_weather",
                        "arguments": json.dumps(arguments, ensure_ascii=False) if number % 4 < 2 else arguments,
                    },
                }]}
                if number % 2:
                    call["reasoning_content"] = "I should look it up."
                messages += [call, {"role": "tool", "tool_call_id": f"call_{turn}", "name": "get_weather",
                                    "content": json.dumps({"temp": rng.randint(-5, 30)})}]
            style = STYLES[(number * 3 + turn) % len(STYLES)]
            messages.append(assistant(rng, style, f"answer {turn}: {rng.choice(TEXTS)}"))
        record = {"id": f"gen-{number}", "messages": messages}
        if tools:
            record["tools"] = tools
        records.append(record)
    return records


def call_in(function: dict, text: str) -> bool:
    """A tool call's name and its arguments' keys and string values are in the text, as
    written or JSON-escaped once or twice (the generated arguments are one string each)."""
    def escaped(part: str) -> list[str]:
        return [json.dumps(part, ensure_ascii=ascii)[1:-1] for ascii in (True, False)]

    arguments = function["arguments"]
    arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    return function["name"] in text and all(
        any(form in text for form in [part, *escaped(part), *(f for once in escaped(part) for f in escaped(once))])
        for key, value in arguments.items() for part in (key, value)
    )


@functools.cache
def converted(template: str) -> tuple[list[dict], list[dict], dict, dict, str]:
    """Generated records, and the CLI's packed rows, rejections (by line), manifest and
    summary for them (verified by `onepass-prep verify`), once per template and session."""
    records = generated_records(seed=len(template), count=22)
    tmp_path = Path(tempfile.mkdtemp(prefix=f"templates-{template}-", dir=_FOLDER.name))
    data = tmp_path / "chats.jsonl"
    write_jsonl(data, records)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "convert", str(data), "--model", "qwen", "-o", str(out), "--max-seq-len", "16384",
        "--chat-template", str(TEMPLATES / template), "--chat-template-kwargs", json.dumps(KWARGS[template]),
    ])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()
    rejected = {}
    for line in (out / "rejected.jsonl").read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        rejected[entry["line"]] = entry
    verified = CliRunner().invoke(app, ["verify", str(out), "--input", str(data)])
    assert verified.exit_code == 0, verified.output
    return records, rows, rejected, json.loads((out / "manifest.json").read_text()), result.output


@functools.cache
def oracle(template: str) -> tuple[dict[int, list[tuple[list[int], int]]], dict[int, tuple[str, str]]]:
    """The N-pass samples of each generated record (by line) from the independent oracle,
    and the lines it rejects, with the kind and the template's own message (the template
    cannot render them) or the kind alone (they train nothing)."""
    records = converted(template)[0]
    tokenizer, reads = reference_tokenizer(TEMPLATES / template), READS[template]
    samples, refused = {}, {}
    for line, record in enumerate(records, start=1):
        try:
            found = contract_samples(record, tokenizer, reads, KWARGS[template])
        except Refused as error:
            refused[line] = ("template-error", str(error))
            continue
        if not any(start < len(ids) for ids, start in found):
            refused[line] = ("nothing-to-train", "")
            continue
        samples[line] = found
    return samples, refused


@pytest.mark.parametrize("template", sorted(KWARGS))
def test_template_converts_exactly(template):
    """Packed rows train exactly the oracle's pairs; rejections, audit and verify agree."""
    records, rows, rejected, manifest, output = converted(template)
    tokenizer = reference_tokenizer(TEMPLATES / template)
    samples, refused = oracle(template)
    expected = sum((n_pass_pairs(found) for found in samples.values()), Counter())
    turns_with_reasoning = dropped = turns_with_calls = calls_dropped = 0
    for line, found in samples.items():
        assistants = [m for m in record_messages(records[line - 1]) if m["role"] == "assistant"]
        for message, (ids, start) in zip(assistants, found, strict=True):
            reasoning, trained = contract_reasoning(message), tokenizer.decode(ids[start:])
            if start < len(ids) and reasoning and reasoning.strip():
                turns_with_reasoning += 1
                dropped += reasoning.strip() not in trained
            if start < len(ids) and message.get("tool_calls"):
                turns_with_calls += 1
                calls_dropped += not all(call_in(call["function"], trained) for call in message["tool_calls"])
    assert set(rejected) == set(refused), {n: rejected[n]["reason"] for n in set(rejected) ^ set(refused) if n in rejected}
    for line, (kind, message) in refused.items():
        assert rejected[line]["kind"] == kind
        assert rejected[line]["reason"].endswith(message)
        if kind == "template-error":
            assert rejected[line]["reason"].startswith("chat template failed: ")
    # Each pair with its total weight (token mean, weight 1 per sample): conversations that
    # share a tree train a shared pair once, weighted by how many samples train it.
    got = weight_totals(sum((one_pass_pairs(row, with_weight=True) for row in rows), Counter()))
    assert got == {pair: float(count) for pair, count in expected.items()}
    assert len(rows) < len(records) - len(refused)  # packed: several chats per row
    assert manifest["reasoning_audit"] == {
        "turns_with_reasoning": turns_with_reasoning, "reasoning_dropped": dropped,
    }
    assert manifest["tool_call_audit"] == {
        "turns_with_tool_calls": turns_with_calls, "tool_calls_dropped": calls_dropped,
    }
    assert turns_with_calls > 0
    assert ("trained without one of them" in output) == (calls_dropped > 0)
    # R1 renders calls only for a content that is none, which transformers makes absent;
    # Kimi prints the call's id, not its name; the others print both name and arguments
    if template in ("deepseek-r1-distill-qwen.jinja", "kimi-k2-thinking.jinja"):
        assert calls_dropped == turns_with_calls
    elif template in ("qwen3.jinja", "glm-4.6.jinja", "gpt-oss.jinja", "keep_reasoning.jinja"):
        assert calls_dropped == 0
    assert manifest["options"]["chat_template_kwargs"] == KWARGS[template]
    assert ("drops the reasoning of the turn being trained" in output) == (dropped > 0)
    if template in ("deepseek-r1-distill-qwen.jinja", "deepseek-v3.1.jinja"):
        assert dropped > 0  # they strip the trained turn's reasoning (but in tool calls, R1)
    if template in SOME_TURNS:
        assert 0 < dropped < turns_with_reasoning  # the first (Kimi: every plain) answer's
    elif READS[template] is not None:
        assert dropped == 0


@pytest.mark.parametrize("template", sorted(KWARGS))
def test_template_rows_give_n_pass_losses(template):
    """A tiny random Qwen3's per-token losses over the packed rows equal N separate passes."""
    rows = converted(template)[1]
    samples = [sample for found in oracle(template)[0].values() for sample in found]
    assert_losses_match(tiny_qwen3(), rows, samples)


@pytest.mark.parametrize("template", sorted(KWARGS))
def test_probe_finds_a_field_exactly_when_the_template_reads_one(template):
    """transformers copies `reasoning_content`, `reasoning` and `thinking` into one
    another before rendering, so for a template that reads a field the probe may name
    another one; the template receives the reasoning either way."""
    loaded = load_tokenizer("qwen", (TEMPLATES / template).read_text(encoding="utf-8"))
    renderer = Renderer(loaded.tokenizer, ("<think>", "</think>"), KWARGS[template])
    assert (renderer.reasoning_field(KWARGS[template]) is None) == (READS[template] is None)


def test_probe_finds_a_field_read_only_after_a_system_message(tmp_path):
    """field_after_system.jinja renders `reasoning_content` only in a conversation that
    starts with a system message, so only the probes with a system message find the field
    (docs/input.md); rows of a chat with one and a chat without train exactly the oracle's
    samples (the field as READS, read off the template, says)."""
    template = TEMPLATES / "field_after_system.jinja"
    tokenizer = reference_tokenizer(template)
    assert Renderer(tokenizer, ("<think>", "</think>")).reasoning_field({}) == READS[template.name]
    turns = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4.", "reasoning_content": "Two and two make four."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6.", "reasoning_content": "Three and three make six."},
    ]
    records = [
        {"id": "with-system", "messages": [{"role": "system", "content": "Be brief."}, *turns]},
        {"id": "without", "messages": turns},
    ]
    write_jsonl(tmp_path / "chats.jsonl", records)
    result = CliRunner().invoke(app, [
        "convert", str(tmp_path / "chats.jsonl"), "--model", "qwen", "-o", str(tmp_path / "out"),
        "--chat-template", str(template),
    ])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet"))).to_pylist()
    samples = {r["id"]: contract_samples(r, tokenizer, READS[template.name]) for r in records}
    assert "Two and two" in tokenizer.decode(samples["with-system"][0][0]) != tokenizer.decode(samples["without"][0][0])
    expected = sum((n_pass_pairs(found) for found in samples.values()), Counter())
    got = weight_totals(sum((one_pass_pairs(row, with_weight=True) for row in rows), Counter()))
    assert got == {pair: float(count) for pair, count in expected.items()}
