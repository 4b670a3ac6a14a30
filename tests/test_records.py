"""Input normalisation: one canonical chat per line, or a rejection that says why."""

import json

import pytest

from onepass_prep.records import Conversation, Rejection, parse_line

THINK = ("<think>", "</think>")


def parse(record) -> Conversation | Rejection:
    raw = record if isinstance(record, bytes) else json.dumps(record).encode()
    return parse_line(raw, "chats.jsonl", 7, THINK)


def test_inline_reasoning_moves_to_reasoning_content():
    chat = parse({"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nIt is 4."},
    ]})
    assert chat.messages[1] == {"role": "assistant", "content": "It is 4.", "reasoning_content": "add them"}
    assert chat.id == "chats.jsonl:7"


def test_closing_tag_alone_is_reasoning_too():
    """Qwen3 puts <think> in the generation prompt, so outputs often start inside it."""
    chat = parse({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "hm</think>a"},
    ]})
    assert chat.messages[1]["reasoning_content"] == "hm"
    assert chat.messages[1]["content"] == "a"


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "thinking"])
def test_reasoning_fields_of_any_common_name_become_reasoning_content(field):
    chat = parse({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", field: "r"},
    ]})
    assert chat.messages[1] == {"role": "assistant", "content": "a", "reasoning_content": "r"}


def test_sharegpt_roles_map_to_openai_roles():
    chat = parse({"id": 5, "conversations": [
        {"from": "system", "value": "s"}, {"from": "human", "value": "h"},
        {"from": "gpt", "value": "<think>r</think>g"},
    ]})
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
    assert chat.messages[2]["reasoning_content"] == "r"
    assert chat.id == "5"


def test_tool_call_with_null_content_is_kept():
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    chat = parse({"messages": [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "1"}, {"role": "assistant", "content": "done"},
    ], "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert chat.messages[1]["content"] == "" and chat.messages[1]["tool_calls"] == [call]
    assert chat.tools


@pytest.mark.parametrize(
    "record, kind",
    [
        (b"{not json", "invalid-json"),
        (b"[1, 2]", "not-an-object"),
        (b"\xff\xfe{}", "not-utf8"),
        ({"text": "hi"}, "no-messages"),
        ({"messages": "hi"}, "bad-messages"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no-assistant"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown-role"),
        ({"conversations": [{"from": "bard", "value": "x"}]}, "unknown-role"),
        ({"messages": [{"role": "assistant", "content": ["part"]}]}, "non-string-content"),
        ({"messages": [{"role": "assistant", "content": "<think>never closed"}]}, "bad-think-tags"),
        ({"messages": [{"role": "assistant", "content": "<think>a</think><think>b</think>c"}]}, "bad-think-tags"),
        ({"messages": [{"role": "assistant", "content": "x</think>y<think>"}]}, "bad-think-tags"),
        ({"messages": [{"role": "assistant", "content": "<think>a</think>b", "reasoning_content": "c"}]}, "bad-think-tags"),
        ({"messages": [{"role": "assistant", "content": "a"}], "tools": "all"}, "bad-tools"),
        ({"messages": [{"role": "assistant", "content": "a", "reasoning": "r", "thinking": "t"}]}, "double-reasoning"),
    ],
)
def test_bad_records_are_rejected_with_a_kind_and_the_raw_line(record, kind):
    rejection = parse(record)
    assert isinstance(rejection, Rejection)
    assert (rejection.kind, rejection.source, rejection.line) == (kind, "chats.jsonl", 7)
    assert rejection.reason and rejection.raw


def test_blank_lines_are_skipped():
    assert parse_line(b"  \n", "chats.jsonl", 1, THINK) is None
