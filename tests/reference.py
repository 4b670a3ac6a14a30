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


def segment_of_tokens(seg_lens) -> np.ndarray:
    return np.repeat(np.arange(len(seg_lens)), seg_lens)


def dense_mask(seg_lens, seg_parents) -> np.ndarray:
    """visible[q, kv] by the FORMAT.md rule, token by token, slowly and plainly."""
    segment = segment_of_tokens(seg_lens)
    length = len(segment)
    ancestors = []
    for s, parent in enumerate(seg_parents):
        chain = {s}
        while parent != -1:
            chain.add(int(parent))
            parent = seg_parents[parent]
        ancestors.append(chain)
    visible = np.zeros((length, length), dtype=bool)
    for q in range(length):
        for kv in range(q + 1):
            visible[q, kv] = segment[kv] in ancestors[segment[q]]
    return visible


def one_pass_pairs(row: dict) -> Counter:
    """Multiset of (visible context, target) over every labelled token of a row.

    Also checks what makes the pairs meaningful: labels equal input ids, the context's
    position ids are 0..n-1, and the predicting token is the label's parent.
    """
    ids = np.asarray(row["input_ids"])
    labels = np.asarray(row["labels"])
    positions = np.asarray(row["position_ids"])
    spec = row["mask_spec"]
    visible = dense_mask(spec["seg_lens"], spec["seg_parents"])
    pairs = Counter()
    for j in np.flatnonzero(labels != -100):
        assert labels[j] == ids[j]
        assert j >= 1
        context = np.flatnonzero(visible[j - 1])
        assert list(positions[context]) == list(range(len(context)))
        assert list(np.flatnonzero(visible[j])) == list(context) + [j], "j-1 is not j's parent"
        pairs[(tuple(ids[context].tolist()), int(ids[j]))] += 1
    return pairs
