"""Render a conversation into its N-pass samples with the model's own chat template.

Sample i is `template(messages[:i+1])` for each assistant message i; its trained tokens
are those past the longest common prefix with `template(messages[:i],
add_generation_prompt=True)`. Nothing here assumes where reasoning sits: the layout is
derived from these token sequences alone, so it is exact for any template.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from onepass_prep.encode import PieceEncoder
from onepass_prep.records import BadRecord, Conversation


@dataclass
class Sample:
    input_ids: np.ndarray  # int32, the full rendered sequence of one N-pass sample
    train_start: int  # first trained position; positions before it are context

    @property
    def num_trained(self) -> int:
        return max(0, len(self.input_ids) - self.train_start)


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


Rendered = list[tuple[str, str]] | BadRecord  # (prompt, sample) texts per assistant turn


class Renderer:
    """Turns canonical conversations into N-pass samples for one tokenizer and template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, think_tags: tuple[str, str]):
        self.tokenizer = tokenizer
        self.think_tags = think_tags
        self.encoder = PieceEncoder(tokenizer.backend_tokenizer)
        # Templates that know `reasoning_content` get it as a field; the others (e.g.
        # DeepSeek-R1's, which splits content on </think>) get it inline in `content`.
        self.inline_reasoning = "reasoning_content" not in tokenizer.chat_template

    def template_messages(self, messages: list[dict]) -> list[dict]:
        """The messages exactly as the chat template receives them."""
        if not self.inline_reasoning:
            return messages
        open_tag, close_tag = self.think_tags
        inlined = []
        for message in messages:
            reasoning = message.get("reasoning_content")
            if reasoning is None:
                inlined.append(message)
                continue
            message = {key: value for key, value in message.items() if key != "reasoning_content"}
            if reasoning:
                message["content"] = f"{open_tag}\n{reasoning}\n{close_tag}\n\n{message['content']}"
            inlined.append(message)
        return inlined

    def render_texts(self, conversation: Conversation) -> list[tuple[str, str]]:
        """(prompt text, sample text) for each assistant message, in order."""
        messages = self.template_messages(conversation.messages)
        texts = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._apply(messages[:index], conversation.tools, generation_prompt=True)
            sample = self._apply(messages[: index + 1], conversation.tools, generation_prompt=False)
            texts.append((prompt, sample))
        return texts

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
                rendered.append(self.render_texts(conversation))
            except BadRecord as error:
                rendered.append(error)
        return rendered

    def tokenize(self, rendered: list[Rendered]) -> list[list[Sample] | BadRecord]:
        """Samples from renderings, all tokenized in one call (work the tokenizer does
        outside the GIL): distinct pieces shared between conversations (system prompts,
        tool lists) are tokenized once, and its threads get a batch large enough to keep
        them busy."""
        texts = [text for pairs in rendered if isinstance(pairs, list) for pair in pairs for text in pair]
        ids = iter(self.encoder.encode(texts))
        results: list[list[Sample] | BadRecord] = []
        for pairs in rendered:
            if isinstance(pairs, BadRecord):
                results.append(pairs)
                continue
            samples = []
            for _ in pairs:
                prompt_ids, sample_ids = next(ids), next(ids)
                samples.append(Sample(sample_ids, max(1, common_prefix_length(prompt_ids, sample_ids))))
            results.append(samples)
        return results

    def _apply(
        self, messages: list[dict], tools: list[dict] | None, generation_prompt: bool
    ) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        except Exception as error:  # a template may raise anything; the record is bad
            raise BadRecord(
                "template-error", f"chat template failed: {type(error).__name__}: {error}"
            ) from None
