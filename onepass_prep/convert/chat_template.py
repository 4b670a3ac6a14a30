"""Chat templates rendered by transformers' own compiled template in its own sandbox, with
the work `apply_chat_template` repeats on every call done once per conversation.

`convert` renders every conversation once per view (two views per trained assistant
turn), and each `tokenizer.apply_chat_template(messages[:k], tokenize=False, ...)` call
rebuilds what all views of a conversation share, while the sandbox derives its safety
decision anew for every attribute a template reads. The text here is the same by
construction, not by testing:

- the same template: compiled by transformers' own function, on a private copy of the
  environment it builds (same sandbox class, filters, globals, extensions);
- the same context: messages, tools and kwargs go through the very functions
  `apply_chat_template` uses (message objects to dicts, None-valued keys dropped, plain
  template data, reasoning aliases). They work message by message, so the first k
  prepared messages of a conversation are what `messages[:k]` gives; the views share
  these objects, which the immutable sandbox lets no template change;
- the same sandbox answers: `ImmutableSandboxedEnvironment.is_safe_attribute` depends only
  on the object's type and the attribute's name (never on the value), so for the plain
  types a template reads its answer is remembered per (type, name). Reading a dict key
  as an attribute (`message.content`), which the sandbox answers from the dict without a
  safety check, skips the failed attribute lookup. Every other object takes the full
  checks, and `str.format` is still wrapped on every access.

It is used only where the installed transformers and jinja2 hold exactly the code this
was checked against (a fingerprint of its source) and the tokenizer's class renders with
that code; otherwise, and for a conversation outside what it reproduces (see `prepare`),
`apply_chat_template` itself renders.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.environment
import jinja2.runtime
import jinja2.sandbox
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import PreTrainedTokenizerBase
from transformers.utils import chat_template_utils as hf

# sha256 of the source `_CHECKED` lists, as read in transformers 5.24 with jinja2 3.1.6.
FINGERPRINT = "54f0a4ff406bed1f909b52ac5a4e3ad6cea77b19014a4687a5a45214da3ac550"
_CHECKED: tuple[Callable, ...] = (
    PreTrainedTokenizerBase.apply_chat_template,
    PreTrainedTokenizerBase.get_chat_template,
    hf.render_jinja_template,
    hf._cached_compile_jinja_template,
    hf._normalize_chat_messages,
    hf._message_objects_to_dicts,
    hf._plain_template_data,
    hf._alias_reasoning_fields,
    jinja2.environment.Template.render,
    jinja2.sandbox.SandboxedEnvironment.getattr,
    jinja2.sandbox.SandboxedEnvironment.is_safe_attribute,
    jinja2.sandbox.ImmutableSandboxedEnvironment.is_safe_attribute,
    jinja2.sandbox.is_internal_attribute,
    jinja2.sandbox.modifies_known_mutable,
)
# Names a template kwarg cannot have without changing what apply_chat_template does with it
# (its own arguments, render_jinja_template's, the template's `messages`).
_RESERVED = frozenset(
    [*inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters]
    + [*inspect.signature(hf.render_jinja_template).parameters]
    + ["messages"]
)
# What an exact dict answers to as an attribute: the names its type and base define.
_DICT_ATTRIBUTES = frozenset(name for klass in dict.__mro__ for name in vars(klass))


@functools.cache
def _fingerprint() -> str:
    digest = hashlib.sha256()
    for function in _CHECKED:
        digest.update(inspect.getsource(function).encode())
    return digest.hexdigest()


class _RememberingSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox with `getattr` answering as the sandbox's own does: the
    attribute's safety is remembered per (type, name) for `_remembered` types, whose
    `isinstance` answers (all the safety check looks at besides the name) are fixed by
    their type."""

    _remembered: frozenset[type]
    _safe: dict[tuple[type, str], bool]

    def getattr(self, obj: Any, attribute: str) -> Any:
        kind = type(obj)
        if kind is dict and attribute not in _DICT_ATTRIBUTES:
            # The sandbox's path when the attribute lookup fails: the item, or undefined.
            try:
                return obj[attribute]
            except (TypeError, LookupError):
                return self.undefined(obj=obj, name=attribute)
        if kind not in self._remembered:
            return super().getattr(obj, attribute)
        try:
            value = getattr(obj, attribute)
        except AttributeError:
            try:
                return obj[attribute]
            except (TypeError, LookupError):
                return self.undefined(obj=obj, name=attribute)
        wrapped = self.wrap_str_format(value)
        if wrapped is not None:
            return wrapped
        safe = self._safe.get((kind, attribute))
        if safe is None:
            safe = self._safe[kind, attribute] = self.is_safe_attribute(obj, attribute, value)
        return value if safe else self.unsafe_undefined(obj, attribute)


@dataclass
class Prepared:
    """A conversation as every one of its views hands it to the template."""

    messages: list[dict]
    tools: list | None
    kwargs: dict


class TemplateEngine:
    """Renders a tokenizer's single chat template as `apply_chat_template(...,
    tokenize=False)` does; made by `for_tokenizer`, which says why where it cannot be."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: jinja2.Template):
        self.tokenizer = tokenizer
        self.template = template

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> TemplateEngine | str:
        """The engine, or the reason `apply_chat_template` must render instead."""
        template = tokenizer.chat_template
        if not isinstance(template, str):
            return "the tokenizer has no single chat template"
        for name in ("apply_chat_template", "get_chat_template"):
            if getattr(type(tokenizer), name) is not getattr(PreTrainedTokenizerBase, name):
                return f"{type(tokenizer).__name__} has its own {name}"
        try:
            fingerprint = _fingerprint()
        except (OSError, TypeError):
            return "the source of transformers' chat-template code cannot be read"
        if fingerprint != FINGERPRINT:
            return (
                "the installed transformers/jinja2 chat-template code is not the code the fast path "
                "was checked against (transformers 5.24, jinja2 3.1.6)"
            )
        try:
            compiled = hf._cached_compile_jinja_template(template)
        except Exception as error:  # noqa: BLE001  # apply_chat_template raises it on every call
            return f"the chat template does not compile ({type(error).__name__})"
        environment = compiled.environment
        if type(environment) is not ImmutableSandboxedEnvironment:
            return f"transformers compiles templates in a {type(environment).__name__}"
        namespace = environment.globals["namespace"]  # transformers' own, which reports its true class
        assert isinstance(namespace, type)
        # The same object, with getattr answering from remembered decisions.
        environment.__class__ = _RememberingSandbox
        assert isinstance(environment, _RememberingSandbox)
        environment._safe = {}
        environment._remembered = frozenset(
            [dict, list, tuple, str, int, float, bool, type(None), jinja2.runtime.LoopContext, namespace]
        )
        return cls(tokenizer, compiled)

    def prepare(self, messages: list[dict], tools: list[dict] | None, kwargs: dict) -> Prepared | None:
        """What `apply_chat_template(messages[:k], tools=tools, **kwargs)` hands the
        template, for every k; None for a conversation it does not reproduce, which
        `apply_chat_template` renders (and rejects) itself: template kwargs named like
        its own arguments, tools that are not JSON schemas, a message it refuses."""
        if not all(type(message) is dict for message in messages):
            return None
        template_kwargs = {**self.tokenizer.special_tokens_map, **kwargs}
        if not _RESERVED.isdisjoint(template_kwargs):
            return None
        try:
            chat = hf._alias_reasoning_fields(hf._plain_template_data(hf._normalize_chat_messages(messages)))
            if tools is not None:
                if not all(isinstance(tool, dict) for tool in tools):
                    return None
                tools = hf._plain_template_data(list(tools))
            plain_kwargs = hf._plain_template_data(template_kwargs)
        except Exception:  # noqa: BLE001  # apply_chat_template meets it too, view by view
            return None
        if not all(isinstance(message, dict) for message in chat):
            return None
        return Prepared(chat, tools, plain_kwargs)

    def render(self, prepared: Prepared, count: int, generation_prompt: bool) -> str:
        """The text of the view `messages[:count]` (count >= 1: an empty one is
        apply_chat_template's to refuse)."""
        return self.template.render(
            messages=prepared.messages[:count],
            tools=prepared.tools,
            documents=None,
            add_generation_prompt=generation_prompt,
            **prepared.kwargs,
        )
