"""Independent N-pass references for tests: straight from `apply_chat_template` and the
docs/FORMAT.md attention rule, sharing no code with the converter's layout."""

from __future__ import annotations

from collections import Counter

import numpy as np


def n_pass_samples(messages: list[dict], tools, tokenizer) -> list[tuple[list[int], int]]:
    """(token ids, first trained position) of each assistant turn's N-pass sample."""
    samples = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        full = tokenizer.apply_chat_template(
            messages[: index + 1], tools=tools, tokenize=True, return_dict=False
        )
        prompt = tokenizer.apply_chat_template(
            messages[:index],
            tools=tools,
            tokenize=True,
            add_generation_prompt=True,
            return_dict=False,
        )
        common = 0
        while common < min(len(full), len(prompt)) and full[common] == prompt[common]:
            common += 1
        samples.append((list(full), max(1, common)))
    return samples


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


def one_pass_pairs(row: dict) -> Counter:
    """Multiset of (visible context, target) over every labelled token of a row.

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
        pairs[(tuple(ids[context].tolist()), int(ids[j]))] += 1
    return pairs
