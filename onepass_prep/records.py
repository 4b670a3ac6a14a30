"""Read chat JSONL into one canonical message form, or a rejection with a reason.

Every line becomes exactly one `Conversation` or one `Rejection` (empty lines are
skipped), so the totals always reconcile: read = converted + rejected.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "observation": "tool",
}
OPENAI_ROLES = {"system", "user", "assistant", "tool"}
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")  # names datasets use


@dataclass
class Conversation:
    """A chat in canonical form: assistant reasoning lives in `reasoning_content`."""

    id: str
    messages: list[dict]
    tools: list[dict] | None
    source: str
    line: int


@dataclass
class Rejection:
    source: str
    line: int
    id: str | None
    kind: str
    reason: str
    raw: str = field(repr=False, default="")

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "line": self.line,
            "id": self.id,
            "kind": self.kind,
            "reason": self.reason,
            "raw": self.raw,
        }


class BadRecord(ValueError):
    """A record that cannot be converted: a short `kind` to count by, and the reason."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def read_jsonl(path: Path, think_tags: tuple[str, str]) -> Iterator[Conversation | Rejection]:
    """Yield one result per non-empty line of `path`, in order."""
    with open(path, "rb") as handle:
        for line_number, raw_bytes in enumerate(handle, start=1):
            yield parse_line(raw_bytes, str(path), line_number, think_tags)


def parse_line(
    raw_bytes: bytes, source: str, line_number: int, think_tags: tuple[str, str]
) -> Conversation | Rejection | None:
    """Parse one JSONL line; `None` for a blank line."""
    try:
        raw = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        text = raw_bytes.decode("utf-8", errors="replace").rstrip("\r\n")
        reason = f"not UTF-8 ({error.reason} at byte {error.start})"
        return Rejection(source, line_number, None, "not-utf8", reason, text)
    raw = raw.rstrip("\r\n")
    if not raw.strip():
        return None
    record_id = None
    try:
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as error:
            raise BadRecord(
                "invalid-json", f"invalid JSON: {error.msg} at column {error.colno}"
            ) from None
        if not isinstance(record, dict):
            raise BadRecord(
                "not-an-object", f"a line must hold a JSON object, got {type(record).__name__}"
            )
        record_id = _record_id(record, source, line_number)
        messages, tools = _canonical_messages(record, think_tags)
    except BadRecord as error:
        return Rejection(source, line_number, record_id, error.kind, str(error), raw)
    return Conversation(record_id, messages, tools, source, line_number)


def _record_id(record: dict, source: str, line_number: int) -> str:
    value = record.get("id")
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    return f"{Path(source).name}:{line_number}"


def _canonical_messages(
    record: dict, think_tags: tuple[str, str]
) -> tuple[list[dict], list[dict] | None]:
    if "messages" in record:
        messages = _openai_messages(record["messages"])
    elif "conversations" in record:
        messages = _sharegpt_messages(record["conversations"])
    else:
        raise BadRecord("no-messages", "no 'messages' or 'conversations' list")
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRecord("no-assistant", "no assistant message")
    tools = record.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(tool, dict) for tool in tools)
    ):
        raise BadRecord("bad-tools", "'tools' must be a list of objects")
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            _split_reasoning(message, index, think_tags)
    return messages, tools or None


def _openai_messages(value: object) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRecord("bad-messages", "'messages' must be a non-empty list")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRecord("bad-messages", f"message {index} is not an object")
        role = message.get("role")
        if role not in OPENAI_ROLES:
            raise BadRecord("unknown-role", f"message {index} has unknown role {role!r}")
        message = dict(message)
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise BadRecord(
                "non-string-content", f"message {index} ({role}) content is not a string"
            )
        message["content"] = content
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and not (
            role == "assistant"
            and isinstance(tool_calls, list)
            and all(isinstance(call, dict) for call in tool_calls)
        ):
            raise BadRecord("bad-tool-calls", f"message {index} has malformed 'tool_calls'")
        messages.append(message)
    return messages


def _sharegpt_messages(value: object) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRecord("bad-messages", "'conversations' must be a non-empty list")
    messages = []
    for index, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise BadRecord("bad-messages", f"turn {index} is not an object")
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise BadRecord("unknown-role", f"turn {index} has unknown role {turn.get('from')!r}")
        if not isinstance(turn.get("value"), str):
            raise BadRecord(
                "non-string-content", f"turn {index} ({turn.get('from')}) value is not a string"
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _split_reasoning(message: dict, index: int, think_tags: tuple[str, str]) -> None:
    """Move inline `<think>…</think>` reasoning into `reasoning_content`, in place."""
    open_tag, close_tag = think_tags
    content = message["content"]
    opens, closes = content.count(open_tag), content.count(close_tag)
    given = [name for name in REASONING_FIELDS if message.get(name) is not None]
    if len(given) > 1:
        raise BadRecord("double-reasoning", f"message {index} has both {given[0]} and {given[1]}")
    # One canonical name, whatever the source called it.
    values = [message.pop(name, None) for name in REASONING_FIELDS]
    reasoning = next((value for value in values if value is not None), None)
    if reasoning is not None:
        message["reasoning_content"] = reasoning
        if not isinstance(reasoning, str):
            raise BadRecord(
                "non-string-content", f"message {index} reasoning_content is not a string"
            )
        if opens or closes:
            raise BadRecord(
                "bad-think-tags", f"message {index} has reasoning_content and think tags in content"
            )
        return
    if opens == 0 and closes == 0:
        return
    if opens > 1 or closes > 1:
        raise BadRecord("bad-think-tags", f"message {index} has more than one think block")
    if closes == 0:
        raise BadRecord("bad-think-tags", f"message {index} has an unclosed {open_tag}")
    head, answer = content.split(close_tag)
    if opens == 1:
        if open_tag not in head:
            raise BadRecord("bad-think-tags", f"message {index} has {open_tag} after {close_tag}")
        prefix, _, head = head.partition(open_tag)
        if prefix.strip():
            raise BadRecord("bad-think-tags", f"message {index} has text before {open_tag}")
    message["reasoning_content"] = head.strip("\n")
    message["content"] = answer.lstrip("\n")
