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
