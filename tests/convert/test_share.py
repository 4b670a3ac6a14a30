"""Conversations that share a prefix share a tree (docs/FORMAT.md, "Shared prefixes"):
through the CLI, on generated data of the three shapes (agent traces with one long system
prompt and tool list, several responses per prompt, branching conversations), every
trained (context, token) pair carries the total weight the N-pass expansion of every
conversation gives it, under every normalization and --train-on; a tiny model's loss and
gradients are the N-pass objective's; --no-share-prefixes keeps a tree per conversation.

Expected values come from tests/helpers/reference.py (apply_chat_template, the FORMAT.md
table), never from the converter."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import synth
import torch
from helpers.reference import (
    contract_samples,
    message_weights,
    one_pass_pairs,
    reference_tokenizer,
    weight_totals,
    weighted_pairs,
)
from helpers.runs import cli, converted, rows, write_jsonl
from helpers.torch_models import gradients, n_pass_objective
from transformers import Qwen3Config, Qwen3ForCausalLM

from onepass_prep.torch import OnePassCollator, forward_loss, install_mask_hook, step_denominator

CHOICES = [{}, {}, {"weight": 0}, {"loss_weight": 0.5}, {"weight": 2.5}]
MAX_LEN = "2048"  # small enough that the agent conversations need two trees


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    """The three shapes in one input, assistant messages given seeded weights."""
    rng = random.Random(3)
    records = json.loads(json.dumps([  # a copy each: conversations of a shape share message dicts
        *synth.agent(8, seed=1, shared_tokens=600, scale=0.5),
        *synth.responses(10, seed=2, scale=0.2),
        *synth.branching(9, seed=3, scale=0.2),
    ]))
    for record in records:
        for message in record["messages"]:
            if message["role"] == "assistant":
                message.update(rng.choice(CHOICES))
        if message_weights(record)[-1] == 0:  # the last turn trains: --train-on last rejects nothing
            record["messages"][-1]["weight"] = 1
    path = tmp_path_factory.mktemp("shapes") / "shapes.jsonl"
    write_jsonl(path, records)
    return records, path


@pytest.fixture(scope="module")
def oracle(shapes) -> dict[str, list[tuple[list[int], int]]]:
    tokenizer = reference_tokenizer()
    return {record["id"]: contract_samples(record, tokenizer, "reasoning_content") for record in shapes[0]}


def expected_totals(records, samples, normalization, train_on) -> tuple[dict, dict]:
    """(context, token) -> total loss weight over every conversation, and units per id."""
    pairs, units = Counter(), {}
    for record in records:
        found, units[record["id"]] = weighted_pairs(
            samples[record["id"]], message_weights(record, train_on), normalization
        )
        pairs += found
    return weight_totals(pairs), units


def row_totals(found: list[dict]) -> dict:
    return weight_totals(sum((one_pass_pairs(row, with_weight=True) for row in found), Counter()))


@pytest.mark.parametrize("train_on", ["all", "last"])
@pytest.mark.parametrize("normalization", ["token", "turn", "conversation"])
def test_shared_trees_train_every_pair_with_its_total_weight(normalization, train_on, shapes, oracle):
    records, source = shapes
    out = converted(f"share-{normalization}-{train_on}", "--max-seq-len", MAX_LEN,
                    "--loss-normalization", normalization, "--train-on", train_on, source=source)
    expected, units = expected_totals(records, oracle, normalization, train_on)
    found = rows(out)
    got = row_totals(found)
    assert got.keys() == expected.keys()
    for pair, weight in expected.items():
        assert got[pair] == pytest.approx(weight, rel=1e-5)
    for row in found:
        assert row["loss_units"] == sum(units[i] for i in row["conversation_ids"])
    assert sorted(i for row in found for i in row["conversation_ids"]) == sorted(r["id"] for r in records)
    assert (out / "rejected.jsonl").read_text() == ""
    assert cli("verify", out, "--input", source).exit_code == 0

    # Sharing happened, on each shape, and the agent prefix was cut into two trees.
    shared_trees = Counter()
    for row in found:
        roots = [s for s, parent in enumerate(row["mask_spec"]["seg_parents"]) if parent == -1]
        for root in roots:
            owners = [i for i, owned in zip(row["conversation_ids"], row["conversation_segments"], strict=True)
                      if root in owned]
            if len(owners) > 1:
                shared_trees[owners[0].split("-")[0]] += 1
    assert shared_trees["agent"] == 2 and shared_trees["response"] >= 2 and shared_trees["branch"] >= 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokens"]["one_pass"] < 0.7 * manifest["tokens"]["unshared"]
    assert manifest["tokens"]["one_pass"] == sum(row["num_tokens"] for row in found)


def test_no_share_prefixes_keeps_a_tree_per_conversation(shapes):
    _, source = shapes
    out = converted("share-off", "--max-seq-len", MAX_LEN, "--no-share-prefixes", source=source)
    shared = converted("share-token-all", "--max-seq-len", MAX_LEN, source=source)
    manifest = json.loads((out / "manifest.json").read_text())
    for row in rows(out):
        roots = [s for s, parent in enumerate(row["mask_spec"]["seg_parents"]) if parent == -1]
        assert len(roots) == len(row["conversation_ids"])
        ends = roots[1:] + [len(row["mask_spec"]["seg_lens"])]
        assert row["conversation_segments"] == [list(range(a, b)) for a, b in zip(roots, ends, strict=True)]
    assert manifest["tokens"]["one_pass"] == manifest["tokens"]["unshared"]
    assert manifest["options"]["share_prefixes"] is False
    # the same conversations laid out one tree each, whether or not the run shares
    assert manifest["tokens"]["unshared"] == json.loads((shared / "manifest.json").read_text())["tokens"]["unshared"]


def renumbered(rows_found: list[dict], chats: list) -> tuple[list[dict], list, int]:
    """Token ids renumbered densely over the data (random weights: only which tokens are
    equal matters), so the output layer is small."""
    vocabulary = np.unique(np.concatenate([np.asarray(r["input_ids"]) for r in rows_found]
                                          + [np.asarray(ids) for chat in chats for ids, _ in chat]))

    def dense(ids) -> list[int]:
        return np.searchsorted(vocabulary, np.asarray(ids)).tolist()

    for row in rows_found:
        row["input_ids"] = dense(row["input_ids"])
        row["labels"] = [-100 if label == -100 else token for label, token in zip(row["labels"], row["input_ids"], strict=True)]
    return rows_found, [[(dense(ids), start) for ids, start in chat] for chat in chats], len(vocabulary)


def tiny_qwen3_of(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.3,
                         max_position_embeddings=8192, tie_word_embeddings=False)
    return Qwen3ForCausalLM(config).to(torch.float32).eval()


@pytest.mark.parametrize("normalization", ["token", "conversation"])
def test_tiny_model_loss_and_gradients_equal_the_n_pass_objective(normalization, shapes, oracle):
    """Every row of the run in one optimizer step (tiny random Qwen3, float32, sdpa): the
    one-pass loss and its gradients equal N separate passes averaged as the rule says."""
    records, source = shapes
    out = converted(f"share-{normalization}-all", "--max-seq-len", MAX_LEN,
                    "--loss-normalization", normalization, "--train-on", "all", source=source)
    found, chats, vocab = renumbered(rows(out), [oracle[r["id"]] for r in records])
    batches = [OnePassCollator(pad_to_multiple_of=8)([row]) for row in found]
    model = tiny_qwen3_of(vocab)
    handle = install_mask_hook(model)
    denominator = step_denominator(batches)
    one = sum(forward_loss(model, batch, denominator)[0] for batch in batches)
    one_grads = gradients(model, one)
    handle.remove()
    reference = n_pass_objective(model, chats, [message_weights(r) for r in records], normalization)
    reference_grads = gradients(model, reference)
    torch.testing.assert_close(one.double(), reference, rtol=1e-5, atol=0)
    for name, grad in reference_grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(one_grads[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
