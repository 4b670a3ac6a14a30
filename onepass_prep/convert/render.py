"""Render a conversation into its N-pass samples with the model's own chat template.

Sample i is `template(messages[:i+1])` for each assistant message i; its trained tokens
are those past the longest common prefix with `template(messages[:i],
add_generation_prompt=True)`. Nothing here assumes where reasoning sits: the layout is
derived from these token sequences alone, so it is exact for any template.

The messages the template sees are the record's after the normalization of
docs/input.md, and nothing else: reasoning goes where the template reads it (found by
rendering probes, once per template and set of template kwargs), a null content becomes
"" only where the template cannot render null.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
from transformers import PreTrainedTokenizerBase

from onepass_prep.convert.chat_template import TemplateEngine
from onepass_prep.convert.encode import PieceEncoder
from onepass_prep.convert.records import (
    REASONING_FIELDS,
    BadRecord,
    Conversation,
    split_inline_reasoning,
)

# Whether a turn was given reasoning (or tool calls), and if so whether its trained text
# holds it.
Audit = Literal["none", "kept", "dropped"]
PROBE = "onepass-prep probe 7f3a91"
# Set to "transformers" to render every view with `apply_chat_template` (docs/running.md).
ENGINE_VARIABLE = "ONEPASS_PREP_RENDER"


def _probes() -> list[tuple[list[dict], list[dict] | None]]:
    """Probe conversations (docs/input.md): templates may read the reasoning field only in
    some turns (Kimi-K2-Thinking only after the last plain answer, others only in the last
    turn or only in tool-call chains), some insist on a system message, some on tools."""
    def turn(number: int) -> list[dict]:
        return [{"role": "user", "content": f"Question {number}?"}, {"role": "assistant", "content": f"Answer {number}."}]

    call = {"id": "call_0", "type": "function", "function": {"name": "probe_tool", "arguments": {"x": "1"}}}
    chain = [
        *turn(1),
        {"role": "user", "content": "Use the tool."},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "name": "probe_tool", "content": "2"},
        {"role": "assistant", "content": "Done."},
    ]
    tool = {"type": "function", "function": {
        "name": "probe_tool", "description": "A probe.",
        "parameters": {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]},
    }}
    system = [{"role": "system", "content": "Be brief."}]
    shapes = [turn(1), turn(1) + turn(2), turn(1) + turn(2) + turn(3)]
    return [
        (head + messages, tools)
        for messages, tools in [*((shape, None) for shape in shapes), (chain, [tool]), (chain, None)]
        for head in ([], system)
    ]


PROBES = _probes()


@dataclass
class Sample:
    input_ids: np.ndarray  # int32, the full rendered sequence of one N-pass sample
    train_start: int  # first trained position; positions before it are context
    reasoning: Audit = "none"
    weight: float = 1.0  # the message's loss weight (docs/input.md)
    tool_calls: Audit = "none"

    @property
    def num_trained(self) -> int:
        return max(0, len(self.input_ids) - self.train_start)

    @property
    def is_trained(self) -> bool:
        return self.num_trained > 0 and self.weight > 0


@dataclass
class RenderedTurn:
    prompt: str  # messages[:i] with the generation prompt
    text: str  # messages[:i+1]
    reasoning: Audit
    weight: float
    tool_calls: Audit


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def common_prefix_chars(a: str, b: str) -> int:
    """Length of the longest common prefix, by bisection on C-level slice compares."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def template_messages(
    conversation: Conversation, field: str | None, think_tags: tuple[str, str]
) -> tuple[list[dict], list[str | None]]:
    """The messages as the template receives them (before the null fallback), and each
    message's reasoning text (for the audit).

    `field` is the reasoning field the template reads, or None: then reasoning given
    apart is inlined as `OPEN\\n{r}\\nCLOSE\\n\\n{content}` and inline reasoning stays as
    written. With a field, inline reasoning moves into it.
    """
    open_tag, close_tag = think_tags
    messages, reasoning = [], []
    for index, (message, given) in enumerate(
        zip(conversation.messages, conversation.reasoning, strict=True)
    ):
        content = message["content"]
        if given is None and message["role"] == "assistant" and isinstance(content, str):
            try:
                inline = split_inline_reasoning(content, think_tags)
            except BadRecord as error:
                if field is not None:  # it must move, and cannot
                    raise BadRecord("bad-think-tags", f"message {index} has {error}") from None
                inline = None  # passed as written; the template decides
            if inline is not None:
                given = inline[0]
                if field is not None:
                    message = {**message, "content": inline[1], field: given}
        elif given is not None:
            if field is not None:
                message = {**message, field: given}
            else:
                message = {**message, "content": f"{open_tag}\n{given}\n{close_tag}\n\n{content or ''}"}
        messages.append(message)
        reasoning.append(given)
    return messages, reasoning


T = TypeVar("T")


def with_null_fallback(render: Callable[[list[dict]], T], messages: list[dict]) -> T:
    """`render(messages)`; if the template raises and some content is null, the same
    messages with "" for null: the record is rendered one way for all its samples."""
    try:
        return render(messages)
    except BadRecord:
        if not any(message["content"] is None for message in messages):
            raise
    return render([{**m, "content": ""} if m["content"] is None else m for m in messages])


def template_error(error: Exception) -> BadRecord:
    return BadRecord("template-error", f"chat template failed: {type(error).__name__}: {error}")


Rendered = list[RenderedTurn] | BadRecord
# A conversation's renderer: the text of messages[:count], with or without the generation prompt.
Views = Callable[[int, bool], str]


class Renderer:
    """Turns conversations into N-pass samples for one tokenizer, template and set of
    template kwargs (a record's own `chat_template_kwargs` are merged over them)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        think_tags: tuple[str, str],
        template_kwargs: dict | None = None,
    ):
        self.tokenizer = tokenizer
        self.think_tags = think_tags
        self.template_kwargs = template_kwargs or {}
        self.encoder = PieceEncoder(tokenizer.backend_tokenizer)
        self._fields: dict[str, str | None] = {}
        forced = os.environ.get(ENGINE_VARIABLE) == "transformers"
        engine = f"{ENGINE_VARIABLE}=transformers" if forced else TemplateEngine.for_tokenizer(tokenizer)
        self.engine = engine if isinstance(engine, TemplateEngine) else None
        # For the run's summary: which engine renders, and why not the fast path.
        self.engine_name = "fast path" if self.engine else "apply_chat_template"
        self.fallback_reason = engine if isinstance(engine, str) else None

    def reasoning_field(self, kwargs: dict) -> str | None:
        """The reasoning field the template renders in any turn of any probe (PROBES),
        once per set of kwargs; None if it renders none of REASONING_FIELDS."""
        key = json.dumps(kwargs, sort_keys=True)
        if key not in self._fields:
            self._fields[key] = next(
                (name for name in REASONING_FIELDS if self._renders_field(name, kwargs)), None
            )
        return self._fields[key]

    def _renders_field(self, name: str, kwargs: dict) -> bool:
        """Whether any marker of the field appears in any N-pass rendering (each prefix
        that ends in an assistant message) of any probe the template accepts."""
        for probe, tools in PROBES:
            messages = [
                {**message, name: f"{PROBE} {index}"} if message["role"] == "assistant" else message
                for index, message in enumerate(probe)
            ]
            for end, message in enumerate(messages, start=1):
                if message["role"] != "assistant":
                    continue
                try:
                    if PROBE in self._apply(messages[:end], tools, False, kwargs):
                        return True
                except BadRecord:
                    break  # the template refuses this shape; the others decide
        return False

    def template_input(self, conversation: Conversation) -> tuple[list[dict], list[str | None], dict]:
        """(messages before the null fallback, each message's reasoning, kwargs)."""
        kwargs = {**self.template_kwargs, **conversation.template_kwargs}
        field = self.reasoning_field(kwargs)
        messages, reasoning = template_messages(conversation, field, self.think_tags)
        return messages, reasoning, kwargs

    def render_turns(self, conversation: Conversation) -> list[RenderedTurn]:
        """The prompt and sample texts of each trained assistant message (weight > 0), in
        order, each with whether its reasoning and tool calls made it into its trained text."""
        messages, reasoning, kwargs = self.template_input(conversation)

        def render(messages: list[dict]) -> list[tuple[int, str, str]]:
            view = self._views(messages, conversation.tools, kwargs)
            return [
                (index, view(index, True), view(index + 1, False))
                for index, message in enumerate(messages)
                if message["role"] == "assistant" and conversation.weights[index] > 0
            ]

        return [
            RenderedTurn(
                prompt, text, _audit(reasoning[index], prompt, text), conversation.weights[index],
                _audit_tool_calls(messages[index].get("tool_calls"), prompt, text),
            )
            for index, prompt, text in with_null_fallback(render, messages)
        ]

    def samples(self, conversation: Conversation) -> list[Sample]:
        result = self.tokenize(self.render_many([conversation]))[0]
        if isinstance(result, BadRecord):
            raise result
        return result

    def render_many(self, conversations: list[Conversation]) -> list[Rendered]:
        """Each conversation's renderings, or why the template refused it (Python work)."""
        rendered: list[Rendered] = []
        for conversation in conversations:
            try:
                rendered.append(self.render_turns(conversation))
            except BadRecord as error:
                rendered.append(error)
        return rendered

    def tokenize(self, rendered: list[Rendered]) -> list[list[Sample] | BadRecord]:
        """Samples from renderings, all tokenized in one call (work the tokenizer does
        outside the GIL): distinct pieces shared between conversations (system prompts,
        tool lists) are tokenized once, and its threads get a batch large enough to keep
        them busy."""
        texts = [
            text
            for turns in rendered
            if isinstance(turns, list)
            for turn in turns
            for text in (turn.prompt, turn.text)
        ]
        ids = iter(self.encoder.encode(texts))
        results: list[list[Sample] | BadRecord] = []
        for turns in rendered:
            if isinstance(turns, BadRecord):
                results.append(turns)
                continue
            samples = []
            for turn in turns:
                prompt_ids, sample_ids = next(ids), next(ids)
                start = max(1, common_prefix_length(prompt_ids, sample_ids))
                samples.append(Sample(sample_ids, start, turn.reasoning, turn.weight, turn.tool_calls))
            results.append(samples)
        return results

    def _apply(
        self, messages: list[dict], tools: list[dict] | None, generation_prompt: bool, kwargs: dict
    ) -> str:
        return self._views(messages, tools, kwargs)(len(messages), generation_prompt)

    def _views(self, messages: list[dict], tools: list[dict] | None, kwargs: dict) -> Views:
        """Renders `messages[:count]` as `apply_chat_template(..., tokenize=False)` does: with
        the fast path where it holds for this conversation (its work shared by all views),
        else with `apply_chat_template` itself."""
        engine = self.engine
        prepared = engine.prepare(messages, tools, kwargs) if engine else None

        def view(count: int, generation_prompt: bool) -> str:
            try:
                if engine and prepared is not None and count:
                    return engine.render(prepared, count, generation_prompt)
                text = self.tokenizer.apply_chat_template(
                    messages[:count],
                    tools=tools,  # type: ignore[arg-type]  # transformers types tools as dict | Callable
                    tokenize=False,
                    add_generation_prompt=generation_prompt,
                    **kwargs,
                )
            except Exception as error:  # a template may raise anything; the record is bad
                raise template_error(error) from None
            assert isinstance(text, str)  # tokenize=False
            return text

        return view


def _audit(reasoning: str | None, prompt: str, text: str) -> Audit:
    """Whether given reasoning appears in the text past what the prompt already holds."""
    if reasoning is None or not reasoning.strip():
        return "none"
    trained = text[common_prefix_chars(prompt, text) :]
    return "kept" if reasoning.strip() in trained else "dropped"


def _audit_tool_calls(calls: list[dict] | None, prompt: str, text: str) -> Audit:
    """Whether every given tool call appears in the text past what the prompt already holds:
    its function name, and each key and value of its arguments in a form templates print
    (docs/input.md)."""
    if not calls:
        return "none"
    trained = text[common_prefix_chars(prompt, text) :]
    return "kept" if all(_call_printed(call, trained) for call in calls) else "dropped"


def _call_printed(call: dict, trained: str) -> bool:
    function = call.get("function", call)  # OpenAI's {"function": {...}}, or flat
    if not isinstance(function, dict):
        return False
    name, arguments = function.get("name"), function.get("arguments")
    if isinstance(name, str) and name not in trained:
        return False
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return arguments in trained
    return all(any(form in trained for form in _printed_forms(part)) for part in _parts(arguments))


def _parts(value: object) -> list[object]:
    """The keys and scalar values of a JSON value."""
    if isinstance(value, dict):
        return [part for key, item in value.items() for part in (key, *_parts(item))]
    if isinstance(value, list):
        return [part for item in value for part in _parts(item)]
    return [value]


def _printed_forms(value: object) -> set[str]:
    """A JSON scalar as a template may print it: as is, or JSON-escaped (ASCII or not) once
    or twice (a template that applies `tojson` to arguments given as JSON text)."""
    if not isinstance(value, str):
        return {json.dumps(value), str(value)}
    once = {json.dumps(value, ensure_ascii=ascii)[1:-1] for ascii in (True, False)}
    twice = {json.dumps(text, ensure_ascii=ascii)[1:-1] for text in once for ascii in (True, False)}
    return {value, *once, *twice}
