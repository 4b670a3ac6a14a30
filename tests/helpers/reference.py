"""Independent N-pass references for tests: straight from `apply_chat_template`, the
input contract of docs/input.md and the docs/FORMAT.md attention rule, sharing no code
with the converter (neither its reading and normalization of records nor its layout)."""

from __future__ import annotations

import functools
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from onepass_prep.convert.tokenizer import qwen_tokenizer_dir

THINK = ("<think>", "</think>")

# The reasoning field each test template reads in some turn, as read off the
# template's source by a person (the converter finds it by rendering probes).
READS = {
    None: "reasoning_content",  # the bundled Qwen3 template
    "qwen3.jinja": "reasoning_content",
    "qwq-32b.jinja": None,  # splits content on </think>
    "deepseek-r1-distill-qwen.jinja": None,  # splits content on </think>
    "deepseek-v3.1.jinja": None,  # splits content on </think>
    "gpt-oss.jinja": "thinking",
    "glm-4.6.jinja": "reasoning_content",
    "smollm3.jinja": None,  # renders content as given
    "keep_reasoning.jinja": "reasoning_content",
    "raises.jinja": "reasoning_content",
    "strip_history.jinja": None,
    "prompt_not_prefix.jinja": "reasoning_content",
    "kimi-k2-thinking.jinja": "reasoning_content",  # only after the last plain answer
    "field_after_first_answer.jinja": "reasoning_content",  # only after the first answer
    "field_after_system.jinja": "reasoning_content",  # only when a system message comes first
}


def reference_tokenizer(template: Path | None = None):
    """What a trainer would load: `AutoTokenizer`, not the converter's loading code."""
    tokenizer = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))
    if template is not None:
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    return tokenizer


class Refused(Exception):
    """The contract rejects the record: the template cannot render it, or inline
    reasoning that must move into a field cannot be split."""


def contract_samples(
    record: dict, tokenizer, reads: str | None, kwargs: dict | None = None, tags=THINK
) -> list[tuple[list[int], int]]:
    """Each assistant turn's N-pass sample of a raw input record, per the contract of
    docs/input.md; raises `Refused`."""
    messages = contract_messages(record, reads, tags)
    kwargs = {**(kwargs or {}), **(record.get("chat_template_kwargs") or {})}
    try:
        return n_pass_samples(messages, record.get("tools"), tokenizer, **kwargs)
    except Exception as error:
        if not any(m["content"] is None for m in messages):
            raise Refused(f"{type(error).__name__}: {error}") from None
    messages = [{**m, "content": "" if m["content"] is None else m["content"]} for m in messages]
    try:
        return n_pass_samples(messages, record.get("tools"), tokenizer, **kwargs)
    except Exception as error:
        raise Refused(f"{type(error).__name__}: {error}") from None


SHAREGPT = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "tool": "tool", "observation": "tool"}


def record_messages(record: dict) -> list[dict]:
    if "conversations" in record:
        return [{"role": SHAREGPT[t["from"]], "content": t["value"]} for t in record["conversations"]]
    return record["messages"]


def contract_messages(record: dict, reads: str | None, tags=THINK) -> list[dict]:
    """The messages the template receives, before the null fallback."""
    return [_contract_message(m, reads, tags) for m in record_messages(record)]


def contract_reasoning(message: dict, tags=THINK) -> str | None:
    """The reasoning an assistant message of a raw record carries, wherever it is given."""
    for name in ("reasoning_content", "reasoning", "thinking"):
        if message.get(name) is not None:
            return message[name]
    content = message.get("content")
    if isinstance(content, list):
        parts = [p.get(p["type"], p.get("text")) for p in content if p["type"] != "text"]
        return "".join(parts) if parts else None
    try:
        inline = _split_inline(content, tags) if isinstance(content, str) else None
    except Refused:
        return None
    return inline and inline[0]


def _contract_message(message: dict, reads: str | None, tags) -> dict:
    message = {**message, "content": message.get("content")}
    content = message["content"]
    if isinstance(content, list):
        message["content"] = "".join(p["text"] for p in content if p["type"] == "text")
    if message["role"] != "assistant":
        return message
    values = [message.pop(name, None) for name in ("reasoning_content", "reasoning", "thinking")]
    given = next((value for value in values if value is not None), None)
    if isinstance(content, list):
        parts = [p.get(p["type"], p.get("text")) for p in content if p["type"] != "text"]
        given = "".join(parts) if parts else None
    content = message.get("content")
    if reads is None:
        if given is not None:
            message["content"] = f"{tags[0]}\n{given}\n{tags[1]}\n\n{content or ''}"
        return message
    inline = _split_inline(content, tags) if given is None and isinstance(content, str) else None
    if inline is not None:
        given, message["content"] = inline
    if given is not None:
        message[reads] = given
    return message


def _split_inline(content: str, tags) -> tuple[str, str] | None:
    if tags[0] not in content and tags[1] not in content:
        return None
    open_tag, close_tag = map(re.escape, tags)
    match = re.fullmatch(rf"(?:\s*{open_tag})?(.*?){close_tag}(.*)", content, re.S)
    if match is None or any(tag in match[1] + match[2] for tag in tags):
        raise Refused("think tags that cannot be split")
    return match[1].strip("\n"), match[2].lstrip("\n")


def n_pass_samples(messages: list[dict], tools, tokenizer, **kwargs) -> list[tuple[list[int], int]]:
    """(token ids, first trained position) of each assistant turn's N-pass sample."""
    samples = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        full = tokenizer.apply_chat_template(
            messages[: index + 1], tools=tools, tokenize=True, return_dict=False, **kwargs
        )
        prompt = tokenizer.apply_chat_template(
            messages[:index],
            tools=tools,
            tokenize=True,
            add_generation_prompt=True,
            return_dict=False,
            **kwargs,
        )
        common = 0
        while common < min(len(full), len(prompt)) and full[common] == prompt[common]:
            common += 1
        samples.append((list(full), max(1, common)))
    return samples


@functools.cache
def source_samples(source: Path, template: Path | None = None) -> dict[str, list[tuple[list[int], int]]]:
    """Each conversation of a JSONL input (by id, in file order): its N-pass samples, rendered
    by `contract_samples` with `reference_tokenizer`, never by the converter or verify."""
    tokenizer = reference_tokenizer(template)
    records = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {
        str(record["id"]): contract_samples(record, tokenizer, READS[template and template.name])
        for record in records
    }


def n_pass_pairs(samples: list[tuple[list[int], int]]) -> Counter:
    """Multiset of (context, target) over every trained token of every sample."""
    pairs = Counter()
    for ids, start in samples:
        for k in range(start, len(ids)):
            pairs[(tuple(ids[:k]), ids[k])] += 1
    return pairs


def segment_ancestors(seg_parents) -> np.ndarray:
    """ancestor[s, a]: segment a is s or an ancestor of s, by following parents."""
    count = len(seg_parents)
    ancestor = np.zeros((count, count), dtype=bool)
    for s in range(count):
        a = s
        while a != -1:
            ancestor[s, a] = True
            a = int(seg_parents[a])
    return ancestor


def visible_from(q: int, seg_lens, ancestor) -> np.ndarray:
    """Indices of the tokens q may attend to: kv <= q in q's segment or an ancestor's."""
    segment = np.repeat(np.arange(len(seg_lens)), seg_lens)
    return np.flatnonzero(ancestor[segment[q], segment[: q + 1]])


def dense_mask(seg_lens, seg_parents) -> np.ndarray:
    """visible[q, kv] by the FORMAT.md rule."""
    segment = np.repeat(np.arange(len(seg_lens)), seg_lens)
    causal = np.tril(np.ones((len(segment), len(segment)), dtype=bool))
    return segment_ancestors(seg_parents)[segment[:, None], segment[None, :]] & causal


def one_pass_pairs(row: dict, with_weight: bool = False) -> Counter:
    """Multiset of (visible context, target) over every labelled token of a row, with the
    token's loss weight (as float32) if asked.

    Also checks what makes the pairs meaningful: labels equal input ids, the context's
    position ids are 0..n-1, and the predicting token is the label's parent.
    """
    ids = np.asarray(row["input_ids"])
    labels = np.asarray(row["labels"])
    positions = np.asarray(row["position_ids"])
    seg_lens = row["mask_spec"]["seg_lens"]
    ancestor = segment_ancestors(row["mask_spec"]["seg_parents"])
    pairs = Counter()
    for j in np.flatnonzero(labels != -100):
        assert labels[j] == ids[j]
        assert j >= 1
        context = visible_from(j - 1, seg_lens, ancestor)
        assert list(positions[context]) == list(range(len(context)))
        assert list(visible_from(j, seg_lens, ancestor)) == list(context) + [j], "j-1 is not j's parent"
        weight = (float(np.float32(row["loss_weights"][j])),) if with_weight else ()
        pairs[(tuple(ids[context].tolist()), int(ids[j]), *weight)] += 1
    return pairs


def message_weights(record: dict, train_on: str = "all") -> list[float]:
    """The loss weight of each assistant message of a raw record, in order (docs/input.md:
    `weight`, `loss_weight` or `train`, else 1; with `train_on="last"` only the last counts)."""
    turns = record.get("messages") or record.get("conversations")
    weights = []
    for message in turns:
        if message.get("role", SHAREGPT.get(message.get("from"))) != "assistant":
            continue
        if message.get("train") is not None:
            weights.append(1.0 if message["train"] else 0.0)
        else:
            given = message.get("weight", message.get("loss_weight"))
            weights.append(1.0 if given is None else float(given))
    if train_on == "last":
        weights = [0.0] * (len(weights) - 1) + weights[-1:]
    return weights


def weighted_pairs(samples: list[tuple[list[int], int]], weights: list[float], normalization: str) -> tuple[Counter, int]:
    """The (context, target, float32 loss weight) multiset the docs/FORMAT.md "Loss" table
    asks for, and the conversation's loss units."""
    trained = [(ids, start, w) for (ids, start), w in zip(samples, weights, strict=True) if w > 0 and start < len(ids)]
    total = sum(len(ids) - start for ids, start, _ in trained)
    pairs: Counter = Counter()
    for ids, start, w in trained:
        per_token = {"token": w, "turn": w / (len(ids) - start), "conversation": w / total}[normalization]
        for k in range(start, len(ids)):
            pairs[(tuple(ids[:k]), ids[k], float(np.float32(per_token)))] += 1
    units = {"token": total, "turn": len(trained), "conversation": int(bool(trained))}[normalization]
    return pairs, units


def tiny_qwen3():
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=8192,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    return Qwen3ForCausalLM(config).eval()


def token_losses(model, ids, positions, mask, targets_at):
    """Loss of predicting ids[j] from position j - 1, for each j in `targets_at`."""
    ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)[None]
    kwargs = {"position_ids": torch.as_tensor(np.asarray(positions), dtype=torch.long)[None]}
    if mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(mask)[None, None]
    hidden = model.model(input_ids=ids_t, **kwargs).last_hidden_state[0]
    targets_at = torch.as_tensor(targets_at, dtype=torch.long)
    logits = model.lm_head(hidden[targets_at - 1])
    return torch.nn.functional.cross_entropy(logits, ids_t[0, targets_at], reduction="none")


def assert_losses_match(model, rows: list[dict], samples: list[tuple[list[int], int]]) -> None:
    """Every labelled token of the rows has the loss its N-pass sample gives it (1e-5),
    matched by (context, target); no pair is missing or extra. (How often a pair is
    trained, and with what weight, is the pair checks' business: conversations that share
    a tree train a shared pair once.)"""
    expected, got = defaultdict(list), defaultdict(list)
    with torch.no_grad():
        for ids, start in samples:
            at = list(range(start, len(ids)))
            for j, loss in zip(at, token_losses(model, ids, range(len(ids)), None, at), strict=True):
                expected[(tuple(ids[:j]), ids[j])].append(loss.item())
        for row in rows:
            spec = row["mask_spec"]
            mask = dense_mask(spec["seg_lens"], spec["seg_parents"])
            at = np.flatnonzero(np.asarray(row["labels"]) != -100)
            ids = np.asarray(row["input_ids"])
            losses = token_losses(model, ids, row["position_ids"], mask, at)
            for j, loss in zip(at, losses, strict=True):
                got[(tuple(ids[mask[j - 1]].tolist()), int(ids[j]))].append(loss.item())
    assert got.keys() == expected.keys()
    for key, losses in expected.items():
        np.testing.assert_allclose(got[key], losses[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(losses, losses[0], rtol=0, atol=1e-5)


def weight_totals(pairs: Counter) -> dict[tuple, float]:
    """(context, target) -> its loss weight summed over every time it is trained, from a
    (context, target, weight) multiset: the objective, whether a pair shared by several
    samples is trained once per sample or once with their weights added."""
    totals: dict[tuple, float] = defaultdict(float)
    for (context, target, weight), count in pairs.items():
        totals[(context, target)] += weight * count
    return dict(totals)
