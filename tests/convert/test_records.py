"""Input normalisation: one canonical chat per line, or a rejection that says why."""

import json

import pytest

from onepass_prep.convert.records import (
    BadRecord,
    Conversation,
    Rejection,
    parse_line,
    split_inline_reasoning,
)

THINK = ("<think>", "</think>")
USER = {"role": "user", "content": "q"}


def parse(record) -> Conversation | Rejection:
    raw = record if isinstance(record, bytes) else json.dumps(record).encode()
    return parse_line(raw, "chats.jsonl", 7, THINK)


def test_inline_reasoning_is_kept_as_written():
    content = "<think>\nadd them\n</think>\n\nIt is 4."
    chat = parse({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": content}]})
    assert chat.messages[1] == {"role": "assistant", "content": content}
    assert chat.reasoning == [None, None]
    assert chat.id == "chats.jsonl:7"


@pytest.mark.parametrize(
    "content, split",
    [
        ("<think>\nr\n</think>\n\na", ("r", "a")),
        ("<think>r</think>a", ("r", "a")),
        ("  <think>r</think>a", ("r", "a")),
        ("hm</think>a", ("hm", "a")),  # Qwen3 puts <think> in the generation prompt
        ("<think></think>a", ("", "a")),
        (" r </think>\n a", (" r ", " a")),
        ("no tags", None),
        ("<think>\nXr X\n</think>\n\nXa", ("Xr X", "Xa")),  # only newlines are stripped
    ],
)
def test_inline_reasoning_splits_as_qwen3s_template_does(content, split):
    assert split_inline_reasoning(content, THINK) == split


@pytest.mark.parametrize(
    "content",
    [
        "<think>never closed", "<think>a</think><think>b</think>c", "x</think>y<think>", "x<think>r</think>a",
        "<think><think>a</think>b", "<think>a</think>b</think>",
    ],
)
def test_inline_reasoning_that_cannot_be_split_is_a_bad_record(content):
    with pytest.raises(BadRecord):
        split_inline_reasoning(content, THINK)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "thinking"])
def test_reasoning_fields_of_any_common_name_are_held_apart(field):
    chat = parse({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", field: "r"},
    ]})
    assert chat.messages[1] == {"role": "assistant", "content": "a"}
    assert chat.reasoning == [None, "r"]


def test_content_parts_are_joined_and_reasoning_parts_held_apart():
    chat = parse({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "r1"}, {"type": "text", "text": "x"},
            {"type": "reasoning", "text": "r2"}, {"type": "text", "text": "y"},
        ]},
    ]})
    assert [m["content"] for m in chat.messages] == ["ab", "xy"]
    assert chat.reasoning == [None, "r1r2"]
    text_only = parse({"messages": [USER, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]})
    assert text_only.reasoning == [None, None]  # no reasoning parts: no reasoning, not ""


def test_reasoning_fields_of_other_roles_pass_through():
    chat = parse({"messages": [
        {"role": "user", "content": "q", "thinking": "t"}, {"role": "assistant", "content": "a"},
    ]})
    assert chat.messages[0] == {"role": "user", "content": "q", "thinking": "t"}


def test_record_template_kwargs_are_kept():
    chat = parse({"chat_template_kwargs": {"enable_thinking": False}, "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
    ]})
    assert chat.template_kwargs == {"enable_thinking": False}


def test_sharegpt_roles_map_to_openai_roles():
    chat = parse({"id": 5, "conversations": [
        {"from": "system", "value": "s"}, {"from": "human", "value": "h"},
        {"from": "gpt", "value": "<think>r</think>g"},
    ]})
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
    assert chat.messages[2]["content"] == "<think>r</think>g"
    assert chat.id == "5"


def test_null_content_stays_null():
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    chat = parse({"messages": [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "1"}, {"role": "assistant", "content": "done"},
    ], "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert chat.messages[1]["content"] is None and chat.messages[1]["tool_calls"] == [call]
    assert chat.tools


@pytest.mark.parametrize(
    "record, kind",
    [
        (b"{not json", "invalid-json"),
        (b"[1, 2]", "not-an-object"),
        (b"\xff\xfe{}", "not-utf8"),
        ({"text": "hi"}, "no-messages"),
        ({"messages": "hi"}, "bad-messages"),
        ({"messages": []}, "bad-messages"),
        ({"conversations": []}, "bad-messages"),
        ({"messages": [USER, {"role": "assistant", "content": "a"}], "tools": [1]}, "bad-tools"),
        ({"messages": [{"role": "user", "content": "q", "tool_calls": [{}]}, {"role": "assistant", "content": "a"}]}, "bad-tool-calls"),
        ({"messages": [USER, {"role": "assistant", "content": "a", "tool_calls": [1]}]}, "bad-tool-calls"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no-assistant"),
        ({"messages": [{"role": "assistant", "content": "hi"}, USER, {"role": "assistant", "content": "a"}]}, "assistant-first"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown-role"),
        ({"conversations": [{"from": "bard", "value": "x"}]}, "unknown-role"),
        ({"messages": [USER, {"role": "assistant", "content": 5}]}, "non-string-content"),
        ({"messages": [USER, {"role": "assistant", "content": ["part"]}]}, "bad-content-part"),
        ({"messages": [USER, {"role": "assistant", "content": [{"type": "image_url", "image_url": "x"}]}]}, "bad-content-part"),
        ({"messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "x"}]}]}, "bad-content-part"),
        ({"messages": [USER, {"role": "assistant", "content": [{"type": "text"}]}]}, "bad-content-part"),
        ({"messages": [USER, {"role": "assistant", "content": "<think>a</think>b", "reasoning_content": "c"}]}, "bad-think-tags"),
        ({"messages": [USER, {"role": "assistant", "content": [{"type": "thinking", "thinking": "r"}], "reasoning": "c"}]}, "double-reasoning"),
        ({"messages": [USER, {"role": "assistant", "content": "a"}], "chat_template_kwargs": [1]}, "bad-template-kwargs"),
        ({"messages": [USER, {"role": "assistant", "content": "a"}], "chat_template_kwargs": {"tokenize": True}}, "bad-template-kwargs"),
        ({"messages": [USER, {"role": "assistant", "content": "a"}], "tools": "all"}, "bad-tools"),
        ({"messages": [USER, {"role": "assistant", "content": "a", "reasoning": "r", "thinking": "t"}]}, "double-reasoning"),
    ],
)
def test_bad_records_are_rejected_with_a_kind_and_the_raw_line(record, kind):
    rejection = parse(record)
    assert isinstance(rejection, Rejection)
    assert (rejection.kind, rejection.source, rejection.line) == (kind, "chats.jsonl", 7)
    assert rejection.reason and rejection.raw


def test_escaped_text_that_is_valid_unicode_is_read():
    raw = b'{"messages": [{"role": "user", "content": "caf\\u00e9 \\ud83d\\ude00"}, {"role": "assistant", "content": "a"}]}'
    chat = parse(raw)
    assert isinstance(chat, Conversation) and chat.messages[0]["content"] == "caf\u00e9 \U0001f600"


def test_a_rejection_keeps_the_line_without_its_newline_and_no_id_it_could_not_read():
    for raw, kind in ((b"{not json\r\n", "invalid-json"), (b"\xff{}\n", "not-utf8")):
        rejection = parse(raw)
        assert rejection.kind == kind and rejection.id is None
        assert rejection.raw == raw.rstrip(b"\r\n").decode("utf-8", errors="replace")


def test_blank_lines_are_skipped():
    assert parse_line(b"  \n", "chats.jsonl", 1, THINK) is None


def chat_with(*assistants: dict, first: dict = USER) -> dict:
    """A chat alternating user and the given assistant messages."""
    messages = [first]
    for number, fields in enumerate(assistants):
        if number:
            messages.append(USER)
        messages.append({"role": "assistant", "content": f"a{number}", **fields})
    return {"messages": messages}


@pytest.mark.parametrize(
    "fields, weight",
    [({}, 1.0), ({"weight": 0.25}, 0.25), ({"loss_weight": 2}, 2.0), ({"weight": 0}, 0.0),
     ({"train": False}, 0.0), ({"train": True}, 1.0), ({"weight": None, "train": False}, 0.0)],
)
def test_message_weights_are_read_and_taken_out_of_the_message(fields, weight):
    chat = parse(chat_with(fields))
    assert chat.weights == [0.0, weight]
    assert chat.messages[1] == {"role": "assistant", "content": "a0"}


def test_sharegpt_turns_carry_weights_too():
    chat = parse({"conversations": [{"from": "human", "value": "q", "train": False},
                                    {"from": "gpt", "value": "a", "weight": 0.5}]})
    assert chat.weights == [0.0, 0.5]
    assert chat.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize(
    "record, reason",
    [
        (chat_with({"weight": -1}), "message 1 'weight' is -1, not a number >= 0"),
        (chat_with({"loss_weight": "1"}), "message 1 'loss_weight' is '1', not a number >= 0"),
        (chat_with({"weight": True}), "message 1 'weight' is True, not a number >= 0"),
        (chat_with({"train": 1}), "message 1 'train' is 1, not true or false"),
        (chat_with({"weight": 1, "train": True}), "message 1 has both weight and train"),
        (chat_with({}, first={"role": "user", "content": "q", "weight": 1}),
         "message 0 (user) has weight 1; only assistant messages train"),
        (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": NaN}]}',
         "message 1 'weight' is nan, not a number >= 0"),
        (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": Infinity}]}',
         "message 1 'weight' is inf, not a number >= 0"),
    ],
)
def test_bad_weights_are_rejections(record, reason):
    rejection = parse(record)
    assert isinstance(rejection, Rejection)
    assert (rejection.kind, rejection.reason) == ("bad-weight", reason)


def test_a_user_message_may_say_it_is_not_trained():
    chat = parse(chat_with({}, first={"role": "user", "content": "q", "weight": 0}))
    assert chat.weights == [0.0, 1.0]


def test_train_on_last_keeps_only_the_last_assistant_messages_weight():
    record = chat_with({}, {"weight": 0.5}, {"weight": 3})
    record["messages"].append({"role": "user", "content": "thanks"})  # the last message is not an assistant's
    chat = parse_line(json.dumps(record).encode(), "chats.jsonl", 7, THINK, "last")
    assert chat.weights == [0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0]
    assert parse_line(json.dumps(record).encode(), "chats.jsonl", 7, THINK).weights == [0.0, 1.0, 0.0, 0.5, 0.0, 3.0, 0.0]
