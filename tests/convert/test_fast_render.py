"""The fast rendering path (onepass_prep/convert/chat_template.py) against the oracle it
must equal: transformers' own `tokenizer.apply_chat_template(..., tokenize=False)`, on
every template test_templates converts over the generated chats of every input form the
template tests use, plus templates that probe the sandbox. Same text byte for byte, same
exception kind and message, byte-identical converted output, and the fallback named in
the run's summary."""

import copy
import functools
import json
from pathlib import Path

import pytest
from helpers.paths import TEMPLATES
from helpers.runs import write_jsonl
from test_templates import KWARGS, generated_records
from typer.testing import CliRunner

from onepass_prep.cli import app
from onepass_prep.convert import chat_template
from onepass_prep.convert.chat_template import TemplateEngine
from onepass_prep.convert.records import Conversation, parse_line
from onepass_prep.convert.render import ENGINE_VARIABLE, Renderer
from onepass_prep.convert.tokenizer import load_tokenizer

THINK = ("<think>", "</think>")
TEMPLATE_FILES = sorted(KWARGS)  # the templates test_templates converts


@functools.cache
def tokenizer(template_text: str):
    """The Qwen3 tokenizer with this template (a shallow copy: loading is the slow part)."""
    copied = copy.copy(load_tokenizer("qwen").tokenizer)
    copied.chat_template = template_text
    return copied


def engine_for(template_text: str) -> TemplateEngine:
    engine = TemplateEngine.for_tokenizer(tokenizer(template_text))
    assert isinstance(engine, TemplateEngine), engine
    return engine


def outcome(render, *args, **kwargs) -> tuple:
    """The text, or the exception's kind and message (what a rejection is made of)."""
    try:
        return ("text", render(*args, **kwargs))
    except Exception as error:  # noqa: BLE001  # any kind: it must be the same kind
        return ("error", type(error).__name__, str(error))


def conversations(template: str) -> list[Conversation]:
    records = generated_records(seed=len(template), count=22) + generated_records(seed=5, count=11)
    parsed = [
        parse_line(json.dumps(record, ensure_ascii=False).encode(), "gen", line, THINK)
        for line, record in enumerate(records, start=1)
    ]
    return [c for c in parsed if isinstance(c, Conversation)]


def assert_same_views(engine: TemplateEngine, messages: list[dict], tools, kwargs: dict) -> tuple[int, int]:
    """Every view of `messages`, with and without the generation prompt, rendered both
    ways; (texts, errors) compared."""
    prepared = engine.prepare(messages, tools, kwargs)
    assert prepared is not None
    texts = errors = 0
    for count in range(1, len(messages) + 1):
        for generation_prompt in (False, True):
            fast = outcome(engine.render, prepared, count, generation_prompt)
            expected = outcome(
                engine.tokenizer.apply_chat_template, messages[:count], tools=tools, tokenize=False,
                add_generation_prompt=generation_prompt, **kwargs,
            )
            assert fast == expected, (count, generation_prompt, messages[:count])
            texts += fast[0] == "text"
            errors += fast[0] == "error"
    return texts, errors


@pytest.mark.parametrize("template", TEMPLATE_FILES)
def test_fast_text_is_apply_chat_template_text(template):
    """Byte for byte, for every view of every generated chat, as the renderer passes it
    (reasoning placed where the template reads it) and with null content as "" (the null
    fallback), under the template's kwargs and with thinking switched both ways."""
    text = (TEMPLATES / template).read_text(encoding="utf-8")
    engine = engine_for(text)
    texts = errors = 0
    for kwargs in (KWARGS[template], {**KWARGS[template], "enable_thinking": False, "thinking": False}):
        renderer = Renderer(tokenizer(text), THINK, kwargs)
        for conversation in conversations(template):
            messages, _, merged = renderer.template_input(conversation)
            nulls_as_empty = [{**m, "content": ""} if m["content"] is None else m for m in messages]
            for variant in (messages, nulls_as_empty):
                found = assert_same_views(engine, variant, conversation.tools, merged)
                texts, errors = texts + found[0], errors + found[1]
    assert texts > 300
    if template == "raises.jinja":
        assert errors > 0  # error parity, not only text parity


SANDBOX_PROBES = {
    "item as attribute, missing key": "{% for m in messages %}{{ m.role }}:{{ m.content }}|{{ m.missing is defined }}{% endfor %}",
    "dict methods": "{% for m in messages %}{% for k, v in m.items() %}{{ k }}={{ v }};{% endfor %}{{ m.get('x', 'd') }}{% endfor %}",
    "unsafe dict method": "{% for m in messages %}{{ m.update }}{% endfor %}",
    "unsafe list method, twice": "{{ messages.append is defined }}{{ messages.append }}",
    "dunder": "{{ messages.__class__ }}",
    "dunder test only": "{{ messages.__class__ is defined }}|{{ messages[0].__len__ is defined }}",
    "str methods": "{% for m in messages %}{{ m.content.upper() }}{{ m.content.split(' ')|length }}{{ m.content.startswith('q') }}{% endfor %}",
    "str.format": "{{ '{} and {}'.format(messages[0].role, messages|length) }}",
    "str.format escape": "{{ '{0.__class__}'.format(messages) }}",
    "str.format_map": "{{ '{a}'.format_map({'a': 1}) }}",
    "int and float attributes": "{{ (3).real }}{{ (2.5).imag }}{{ (7).bit_length() }}{{ true.real }}",
    "loop": "{% for m in messages %}{{ loop.index }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.previtem is defined }}{{ loop.cycle('a', 'b') }}{% endfor %}",
    "namespace": "{% set ns = namespace(n=0, s='x') %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}{{ ns.s.upper() }}{{ ns.missing is defined }}",
    "namespace underscore": "{% set ns = namespace() %}{% set ns._x = 1 %}{{ ns._x }}",
    # A name safe on one type and unsafe on another: the answers are per (type, name).
    "one name, two types": "{% set ns = namespace(pop=1) %}{{ ns.pop }}|{{ messages.pop is defined }}",
    "tools and kwargs": "{{ tools[0].function.name if tools else 'none' }}{{ bos_token }}{{ eos_token }}{{ extra }}",
    "none and tuples": "{{ none.real is defined }}{{ (1, 2).count(1) }}{{ (1, 2).index is defined }}",
    "raise": "{{ raise_exception('refused: ' ~ messages|length) }}",
    "undefined attribute of undefined": "{{ messages[0].nothing.deeper }}",
    "tojson and dict": "{{ messages|tojson }}{{ dict(a=1).a }}{{ dict(a=1).items()|list }}",
    "reasoning aliases": "{% for m in messages %}{{ m.reasoning_content }}/{{ m.thinking }}/{{ m.reasoning }};{% endfor %}",
    "mro": "{{ messages.__class__.mro }}",
    "syntax error": "{% for m in messages %}",
}


@pytest.mark.parametrize("probe", sorted(SANDBOX_PROBES))
def test_sandbox_answers_are_the_sandboxs(probe):
    """Templates that read what the remembered safety decisions cover (and what they
    leave to the full checks): each renders, or fails, exactly as apply_chat_template."""
    template = SANDBOX_PROBES[probe]
    engine = TemplateEngine.for_tokenizer(tokenizer(template))
    if probe == "syntax error":
        assert isinstance(engine, str) and "does not compile" in engine
        return
    assert isinstance(engine, TemplateEngine)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "question one", "extra_key": None},
        {"role": "assistant", "content": "answer", "reasoning": "because"},
        {"role": "user", "content": "question two"},
    ]
    for tools in (None, [{"type": "function", "function": {"name": "get_weather"}}]):
        for kwargs in ({}, {"extra": [1, {"b": None}]}):
            assert_same_views(engine, messages, tools, kwargs)


def test_conversations_it_does_not_reproduce_go_to_transformers(monkeypatch):
    """Template kwargs named like apply_chat_template's own arguments, tools that are not
    JSON schemas, a message that is not an object, an empty view: apply_chat_template
    renders (or refuses) them, so the renderer answers as with the fast path off."""
    text = (TEMPLATES / "qwen3.jinja").read_text(encoding="utf-8")
    engine = engine_for(text)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    documents = {"documents": [{"title": "t", "text": "x"}]}
    assert engine.prepare(messages, None, documents) is None
    assert engine.prepare(messages, ["get_weather"], {}) is None  # type: ignore[list-item]
    assert engine.prepare([*messages, "not a message"], None, {}) is None  # type: ignore[list-item]
    fast = Renderer(tokenizer(text), THINK)
    monkeypatch.setenv(ENGINE_VARIABLE, "transformers")
    slow = Renderer(tokenizer(text), THINK)
    assert fast.engine is not None and slow.engine is None
    cases = [
        (messages, None, documents, 2), (messages, None, {"add_generation_prompt": True}, 2),
        (messages, None, {"tokenize": True}, 2), (messages, ["get_weather"], {}, 2),
        ([*messages, "not a message"], None, {}, 2), ([*messages, "not a message"], None, {}, 3),
        (messages, None, {}, 0),
    ]
    for view_messages, tools, kwargs, count in cases:
        for generation_prompt in (False, True):
            expected = outcome(slow._views(view_messages, tools, kwargs), count, generation_prompt)
            assert outcome(fast._views(view_messages, tools, kwargs), count, generation_prompt) == expected
    assert outcome(fast._views(messages, None, {}), 0, True)[0] == "error"  # an empty conversation


def convert_with(data: Path, out: Path, template: str, forced: bool, monkeypatch) -> str:
    if forced:
        monkeypatch.setenv(ENGINE_VARIABLE, "transformers")
    else:
        monkeypatch.delenv(ENGINE_VARIABLE, raising=False)
    result = CliRunner().invoke(app, [
        "convert", str(data), "--model", "qwen", "-o", str(out), "--max-seq-len", "16384",
        "--chat-template", str(TEMPLATES / template), "--chat-template-kwargs", json.dumps(KWARGS[template]),
    ])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("template", TEMPLATE_FILES)
def test_shards_are_byte_identical_with_the_fast_path_off(template, tmp_path, monkeypatch):
    """Every output file (shards, rejections, manifest) is the same bytes either way, and
    the summary says which engine rendered."""
    data = tmp_path / "chats.jsonl"
    records = generated_records(seed=len(template), count=22)
    write_jsonl(data, records)
    fast = convert_with(data, tmp_path / "fast", template, False, monkeypatch)
    slow = convert_with(data, tmp_path / "slow", template, True, monkeypatch)
    assert "rendered by │ fast path" in " ".join(fast.split()) and "not the fast path" not in fast
    assert f"not the fast path: {ENGINE_VARIABLE}=transformers" in " ".join(slow.split())
    names = sorted(path.name for path in (tmp_path / "fast").iterdir())
    assert names == sorted(path.name for path in (tmp_path / "slow").iterdir())
    assert any(name.endswith(".parquet") for name in names)
    for name in names:
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "slow" / name).read_bytes(), name
    if template == "raises.jinja":  # the same rejections, kind and message
        assert (tmp_path / "fast" / "rejected.jsonl").read_text(encoding="utf-8").count("this template refuses") > 0


def test_other_transformers_code_falls_back_and_says_so(tmp_path, monkeypatch):
    """Where transformers' chat-template code is not what the fast path was checked
    against, apply_chat_template renders and the summary says why."""
    monkeypatch.setattr(chat_template, "FINGERPRINT", "0" * 64)
    renderer = Renderer(tokenizer((TEMPLATES / "qwen3.jinja").read_text(encoding="utf-8")), THINK)
    assert renderer.engine is None
    assert renderer.engine_name == "apply_chat_template"
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generated_records(seed=1, count=3)), encoding="utf-8")
    output = convert_with(data, tmp_path / "out", "qwen3.jinja", False, monkeypatch)
    assert "not the code the fast path was checked against" in " ".join(output.split())
