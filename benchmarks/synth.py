"""Seeded synthetic multi-turn reasoning chats with realistic shapes, for benchmarks.

Shapes (in words, about 1.3 Qwen3 tokens each): 1-10 turns; user 15-230 words (20-300
tokens); reasoning 75-3000 words (100-4000 tokens); answer 15-600 words (20-800 tokens);
about one conversation in four has tool-call chains.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

WORDS = (
    "the of and to in is that for it as with was on be by this are or from at which but "
    "not have an they you were their one all we can has there been if more when will would "
    "who so no model answer think step first then because therefore value function result "
    "number sum total check compute assume given let us consider case example equation "
    "solve x y z factor prime data table query list array string loop index error test "
    "weather city flight price date time hour minute meter second speed distance area "
    "integral derivative limit matrix vector proof lemma hence thus note wait actually "
    "maybe however also since while where what why how 0 1 2 3 4 5 6 7 8 9 10 42 100 "
    "= + - * / ( ) , . : ; ? ! é ü 数学 答案 π √ ∑"
).split()
TOOLS = [
    {"type": "function", "function": {"name": "search", "description": "Search the web.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
    {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}},
]


def _scaled_text(rng: random.Random, low_tokens: float, high_tokens: float) -> str:
    words = max(1, int(rng.uniform(low_tokens, high_tokens) / 1.3))
    return " ".join(rng.choice(WORDS) for _ in range(words))


def conversation(rng: random.Random, index: int, turns: int | None = None, scale: float = 1.0) -> dict:
    """One chat; reasoning alternates between inline think tags and `reasoning_content`.

    `scale` shrinks every text length (for quick training and memory runs)."""

    def _text(rng: random.Random, low: float, high: float) -> str:
        return _scaled_text(rng, low * scale, high * scale)

    with_tools = rng.random() < 0.25
    messages = [{"role": "system", "content": _text(rng, 10, 60)}] if rng.random() < 0.5 else []
    for _ in range(turns or rng.randint(1, 10)):
        messages.append({"role": "user", "content": _text(rng, 20, 300)})
        for call in range(rng.randint(1, 3) if with_tools and rng.random() < 0.5 else 0):
            tool = rng.choice(TOOLS)["function"]["name"]
            argument = "query" if tool == "search" else "expression"
            messages.append({
                "role": "assistant", "content": "", "reasoning_content": _text(rng, 100, 1000),
                "tool_calls": [{"type": "function", "id": f"call_{call}",
                                "function": {"name": tool, "arguments": {argument: _text(rng, 3, 20)}}}],
            })
            messages.append({"role": "tool", "tool_call_id": f"call_{call}", "content": _text(rng, 20, 300)})
        reasoning, answer = _text(rng, 100, 4000), _text(rng, 20, 800)
        if rng.random() < 0.1:
            messages.append({"role": "assistant", "content": answer})
        elif rng.random() < 0.5:
            messages.append({"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"})
        else:
            messages.append({"role": "assistant", "content": answer, "reasoning_content": reasoning})
    record = {"id": f"synth-{index:07d}", "messages": messages}
    if with_tools:
        record["tools"] = TOOLS
    return record


def conversations(
    count: int, seed: int = 0, turns: int | None = None, scale: float = 1.0
) -> Iterator[dict]:
    rng = random.Random(seed)
    for index in range(count):
        yield conversation(rng, index, turns, scale)


def write(path: Path, count: int, seed: int = 0, turns: int | None = None, scale: float = 1.0) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for record in conversations(count, seed, turns, scale):
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


# The three shapes whose conversations share prefixes (docs/benchmarks.md, "Sharing prefixes").


def agent_tools(rng: random.Random, tokens: float) -> list[dict]:
    """A tool list of about `tokens` tokens (each schema about 150)."""
    tools = []
    for number in range(max(1, int(tokens / 150))):
        tools.append({"type": "function", "function": {
            "name": f"tool_{number}", "description": _scaled_text(rng, 40, 80),
            "parameters": {"type": "object", "properties": {
                f"argument_{k}": {"type": "string", "description": _scaled_text(rng, 5, 15)} for k in range(3)
            }, "required": ["argument_0"]}}})
    return tools


def agent(count: int, seed: int = 0, shared_tokens: float = 4000, scale: float = 1.0) -> Iterator[dict]:
    """Agent traces: one system prompt and tool list (about `shared_tokens` tokens, a fifth of
    it the system prompt) in every conversation, then a few hundred tokens of its own: a
    question, one or two tool calls with their results, an answer."""
    rng = random.Random(seed)
    system = _scaled_text(random.Random(seed + 1), 0.2 * shared_tokens, 0.2 * shared_tokens)
    tools = agent_tools(random.Random(seed + 2), 0.8 * shared_tokens)
    for index in range(count):
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": _scaled_text(rng, 20 * scale, 80 * scale)}]
        for call in range(rng.randint(1, 2)):
            messages.append({
                "role": "assistant", "content": "", "reasoning_content": _scaled_text(rng, 20 * scale, 80 * scale),
                "tool_calls": [{"type": "function", "id": f"call_{call}", "function": {
                    "name": rng.choice(tools)["function"]["name"],
                    "arguments": {"argument_0": _scaled_text(rng, 3 * scale, 10 * scale)}}}],
            })
            messages.append({"role": "tool", "tool_call_id": f"call_{call}",
                             "content": _scaled_text(rng, 20 * scale, 80 * scale)})
        messages.append({"role": "assistant", "content": _scaled_text(rng, 20 * scale, 80 * scale),
                         "reasoning_content": _scaled_text(rng, 20 * scale, 80 * scale)})
        yield {"id": f"agent-{index:07d}", "messages": messages, "tools": tools}


def responses(count: int, seed: int = 0, per_prompt: tuple[int, int] = (4, 8), scale: float = 1.0) -> Iterator[dict]:
    """Rejection sampling / distillation: each prompt (200-1200 tokens) answered several
    times (4-8), each response its own reasoning and answer (200-1200 tokens)."""
    rng = random.Random(seed)
    index = 0
    while index < count:
        prompt = [{"role": "user", "content": _scaled_text(rng, 200 * scale, 1200 * scale)}]
        if rng.random() < 0.5:
            prompt.insert(0, {"role": "system", "content": _scaled_text(rng, 10 * scale, 60 * scale)})
        for _ in range(min(rng.randint(*per_prompt), count - index)):
            reasoning = _scaled_text(rng, 150 * scale, 1000 * scale)
            answer = _scaled_text(rng, 50 * scale, 200 * scale)
            yield {"id": f"response-{index:07d}",
                   "messages": prompt + [{"role": "assistant", "content": answer, "reasoning_content": reasoning}]}
            index += 1


def branching(count: int, seed: int = 0, scale: float = 1.0) -> Iterator[dict]:
    """Branching conversations (OpenAssistant-style trees, retried turns): families of 2-4
    conversations with the same first 1-3 turns, each going on with 1-2 turns of its own."""
    rng = random.Random(seed)

    def turn() -> list[dict]:
        return [{"role": "user", "content": _scaled_text(rng, 20 * scale, 200 * scale)},
                {"role": "assistant", "content": _scaled_text(rng, 20 * scale, 300 * scale),
                 "reasoning_content": _scaled_text(rng, 50 * scale, 800 * scale)}]

    index = 0
    while index < count:
        shared = [message for _ in range(rng.randint(1, 3)) for message in turn()]
        for _ in range(min(rng.randint(2, 4), count - index)):
            own = [message for _ in range(rng.randint(1, 2)) for message in turn()]
            yield {"id": f"branch-{index:07d}", "messages": shared + own}
            index += 1


SHAPES = {"agent": agent, "responses": responses, "branching": branching}


def write_shape(path: Path, shape: str, count: int, seed: int = 0, **options: float) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for record in SHAPES[shape](count, seed, **options):  # type: ignore[operator]
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_mixed(path: Path, count: int, seed: int = 0, turns: int | None = None, scale: float = 1.0) -> Path:
    """`count` records: the chats of `conversations` taking turns with records of the three
    shapes above (a third each, in runs), so that any few dozen consecutive records hold
    conversations that share prefixes."""
    plain = conversations(count - count // 2, seed, turns, scale)
    third = -(-(count // 2) // 3)
    shaped = [*agent(third, seed, shared_tokens=400 * scale / 0.1, scale=scale * 5),
              *responses(third, seed, scale=scale), *branching(third, seed, scale=scale)][: count // 2]
    with open(path, "w", encoding="utf-8") as handle:
        for index, record in enumerate(plain):
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            if index < len(shaped):
                handle.write(json.dumps(shaped[index], ensure_ascii=False) + "\n")
    return path
