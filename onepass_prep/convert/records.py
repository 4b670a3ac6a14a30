"""Read chat JSONL into conversations, their text as given, or a rejection with a reason.

Both shapes (OpenAI messages, ShareGPT) become one message form; reasoning given apart
from the content is held aside for the renderer, which alone knows where the template
reads it. Every line becomes exactly one `Conversation` or one `Rejection` (empty lines are
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
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")  # names datasets and templates use
WEIGHT_FIELDS = ("weight", "loss_weight", "train")  # training metadata, not shown to the template
CONTENT_PART_TYPES = {"text", "reasoning", "thinking"}
UTF8_BOM = b"\xef\xbb\xbf"  # accepted at the start of a file
# apply_chat_template's own arguments: template kwargs may not set them.
RESERVED_TEMPLATE_ARGUMENTS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})


@dataclass
class Conversation:
    """A chat as read, its text untouched. Reasoning given apart from `content` (a field
    or content parts) is held in `reasoning`, one entry per message, until the renderer
    puts it where the template reads it (docs/input.md)."""

    id: str
    messages: list[dict]  # without reasoning and weight fields; `content` a string or None
    reasoning: list[str | None]
    tools: list[dict] | None
    template_kwargs: dict  # the record's own `chat_template_kwargs`
    source: str
    line: int
    weights: list[float]  # each message's loss weight; 0 for context (every non-assistant)


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


def read_jsonl(
    path: Path, think_tags: tuple[str, str], train_on: str = "all"
) -> Iterator[Conversation | Rejection]:
    """Yield one result per non-empty line of `path`, in order."""
    with open(path, "rb") as handle:
        for line_number, raw_bytes in enumerate(handle, start=1):
            result = parse_line(raw_bytes, str(path), line_number, think_tags, train_on)
            if result is not None:
                yield result


def parse_line(
    raw_bytes: bytes, source: str, line_number: int, think_tags: tuple[str, str], train_on: str = "all"
) -> Conversation | Rejection | None:
    """Parse one JSONL line; `None` for a blank line. With `train_on` "last", only the
    final assistant message keeps its weight."""
    if line_number == 1 and raw_bytes.startswith(UTF8_BOM):
        raw_bytes = raw_bytes[len(UTF8_BOM) :]
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
        except RecursionError:
            raise BadRecord("too-deep", "JSON nested too deeply to read") from None
        if "\\u" in raw and _has_lone_surrogate(record):
            raise BadRecord(
                "bad-unicode", "a string holds a lone surrogate escape (\\ud800-\\udfff), not text"
            )
        if not isinstance(record, dict):
            raise BadRecord(
                "not-an-object", f"a line must hold a JSON object, got {type(record).__name__}"
            )
        record_id = _record_id(record, source, line_number)
        conversation = _conversation(record, record_id, source, line_number, think_tags)
        if train_on == "last":
            last = max(i for i, message in enumerate(conversation.messages) if message["role"] == "assistant")
            conversation.weights = [w if i == last else 0.0 for i, w in enumerate(conversation.weights)]
    except BadRecord as error:
        return Rejection(source, line_number, record_id, error.kind, str(error), raw)
    return conversation


def _has_lone_surrogate(record: object) -> bool:
    """JSON may escape half of a UTF-16 pair alone; such a string cannot be encoded, so no
    tokenizer can take it."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _record_id(record: dict, source: str, line_number: int) -> str:
    value = record.get("id")
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    return f"{Path(source).name}:{line_number}"


def _conversation(
    record: dict, record_id: str, source: str, line_number: int, think_tags: tuple[str, str]
) -> Conversation:
    if "messages" in record:
        messages, reasoning = _openai_messages(record["messages"])
    elif "conversations" in record:
        messages = _sharegpt_messages(record["conversations"])
        reasoning = [None] * len(messages)
    else:
        raise BadRecord("no-messages", "no 'messages' or 'conversations' list")
    weights = [_weight(message, index) for index, message in enumerate(messages)]
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRecord("no-assistant", "no assistant message")
    if messages[0]["role"] == "assistant":
        raise BadRecord(
            "assistant-first",
            "the chat starts with an assistant message: its turn has no prompt for the template to render",
        )
    tools = record.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(tool, dict) for tool in tools)
    ):
        raise BadRecord("bad-tools", "'tools' must be a list of objects")
    template_kwargs = record.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict):
        raise BadRecord("bad-template-kwargs", "'chat_template_kwargs' must be an object")
    if reserved := sorted(RESERVED_TEMPLATE_ARGUMENTS & template_kwargs.keys()):
        raise BadRecord(
            "bad-template-kwargs", f"'chat_template_kwargs' may not set {', '.join(reserved)}"
        )
    for index, (message, given) in enumerate(zip(messages, reasoning, strict=True)):
        content = message["content"]
        if given is not None and isinstance(content, str) and any(tag in content for tag in think_tags):
            raise BadRecord(
                "bad-think-tags", f"message {index} has reasoning apart and think tags in content"
            )
    return Conversation(
        record_id, messages, reasoning, tools or None, template_kwargs, source, line_number, weights
    )


def _weight(message: dict, index: int) -> float:
    """A message's loss weight, taken out of the message: `weight` or `loss_weight` (a
    number >= 0) or `train` (true or false); an assistant message weighs 1 unless told,
    any other message 0 (it is never trained, so it may not ask to be)."""
    given = [name for name in WEIGHT_FIELDS if message.get(name) is not None]
    values = [message.pop(name, None) for name in WEIGHT_FIELDS]
    role = message["role"]
    if len(given) > 1:
        raise BadRecord("bad-weight", f"message {index} has both {given[0]} and {given[1]}")
    if not given:
        return 1.0 if role == "assistant" else 0.0
    value = next(value for value in values if value is not None)
    if given[0] == "train":
        if not isinstance(value, bool):
            raise BadRecord("bad-weight", f"message {index} 'train' is {value!r}, not true or false")
        weight = float(value)
    elif isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
        raise BadRecord("bad-weight", f"message {index} '{given[0]}' is {value!r}, not a number >= 0")
    else:
        weight = float(value)
    if weight > 0 and role != "assistant":
        raise BadRecord("bad-weight", f"message {index} ({role}) has weight {value!r}; only assistant messages train")
    return weight


def _openai_messages(value: object) -> tuple[list[dict], list[str | None]]:
    if not isinstance(value, list) or not value:
        raise BadRecord("bad-messages", "'messages' must be a non-empty list")
    messages, reasoning = [], []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRecord("bad-messages", f"message {index} is not an object")
        role = message.get("role")
        if role not in OPENAI_ROLES:
            raise BadRecord("unknown-role", f"message {index} has unknown role {role!r}")
        message = dict(message)
        message["content"], from_parts = _content(message.get("content"), index, role)
        given = None
        if role == "assistant":  # reasoning fields of other roles pass through as any other field
            named = [name for name in REASONING_FIELDS if message.get(name) is not None]
            named += ["reasoning parts"] if from_parts is not None else []
            if len(named) > 1:
                raise BadRecord("double-reasoning", f"message {index} has both {named[0]} and {named[1]}")
            values = [message.pop(name, None) for name in REASONING_FIELDS]
            given = next((value for value in values if value is not None), from_parts)
            if given is not None and not isinstance(given, str):
                raise BadRecord("non-string-content", f"message {index} {named[0]} is not a string")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and not (
            role == "assistant"
            and isinstance(tool_calls, list)
            and all(isinstance(call, dict) for call in tool_calls)
        ):
            raise BadRecord("bad-tool-calls", f"message {index} has malformed 'tool_calls'")
        messages.append(message)
        reasoning.append(given)
    return messages, reasoning


def _content(value: object, index: int, role: str) -> tuple[str | None, str | None]:
    """(content, reasoning from parts) of a message: a string or null as given; a list of
    parts joined, its `text` parts into the content and `reasoning`/`thinking` parts into
    the reasoning (assistant messages only)."""
    if value is None or isinstance(value, str):
        return value, None
    if not isinstance(value, list):
        raise BadRecord(
            "non-string-content",
            f"message {index} ({role}) content is not a string, null or a list of parts",
        )
    texts: list[str] = []
    thoughts: list[str] = []
    for number, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in CONTENT_PART_TYPES or (kind != "text" and role != "assistant"):
            raise BadRecord(
                "bad-content-part",
                f"message {index} ({role}) content part {number} has type {kind!r}; "
                f"readable: text{', reasoning, thinking' if role == 'assistant' else ''}",
            )
        text = part.get(kind) if isinstance(part.get(kind), str) else part.get("text")
        if not isinstance(text, str):
            raise BadRecord(
                "bad-content-part", f"message {index} ({role}) content part {number} has no text"
            )
        (texts if kind == "text" else thoughts).append(text)
    return "".join(texts), "".join(thoughts) if thoughts else None


def _sharegpt_messages(value: object) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRecord("bad-messages", "'conversations' must be a non-empty list")
    messages = []
    for index, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise BadRecord("bad-messages", f"turn {index} is not an object")
        role = SHAREGPT_ROLES.get(str(turn.get("from")))
        if role is None:
            raise BadRecord("unknown-role", f"turn {index} has unknown role {turn.get('from')!r}")
        if not isinstance(turn.get("value"), str):
            raise BadRecord(
                "non-string-content", f"turn {index} ({turn.get('from')}) value is not a string"
            )
        weight = {name: turn[name] for name in WEIGHT_FIELDS if name in turn}
        messages.append({"role": role, "content": turn["value"], **weight})
    return messages


def split_inline_reasoning(content: str, think_tags: tuple[str, str]) -> tuple[str, str] | None:
    """(reasoning, answer) of `content` with inline reasoning, or None without think tags.

    Used only to move reasoning into the field a template reads: the text between the
    tags without surrounding newlines, the answer without leading newlines (what Qwen3's
    template does itself). Forms that cannot be split so are a `BadRecord`.
    """
    open_tag, close_tag = think_tags
    opens, closes = content.count(open_tag), content.count(close_tag)
    if opens == 0 and closes == 0:
        return None
    if opens > 1 or closes > 1:
        raise BadRecord("bad-think-tags", "more than one think block")
    if closes == 0:
        raise BadRecord("bad-think-tags", f"an unclosed {open_tag}")
    head, answer = content.split(close_tag)
    if opens == 1:
        if open_tag not in head:
            raise BadRecord("bad-think-tags", f"{open_tag} after {close_tag}")
        prefix, _, head = head.partition(open_tag)
        if prefix.strip():
            raise BadRecord("bad-think-tags", f"text before {open_tag}")
    return head.strip("\n"), answer.lstrip("\n")
