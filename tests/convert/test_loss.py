"""What trains and with what loss weight: the CLI's rows against the independent oracle's
reading of the message weights and the docs/FORMAT.md "Loss" table."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.paths import SAMPLE
from helpers.reference import (
    contract_samples,
    message_weights,
    one_pass_pairs,
    reference_tokenizer,
    weighted_pairs,
)
from helpers.runs import cli, converted, rows, write_jsonl

CHOICES = [{}, {"weight": 0}, {"loss_weight": 0.5}, {"weight": 2.5}, {"train": False}, {"train": True}]


@pytest.fixture(scope="module")
def weighted(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    """The sample chats (both shapes), their assistant messages given seeded weights in
    every spelling (a few chats keep no weight above 0, so they train nothing)."""
    rng = random.Random(12)
    records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    for record in records:
        for message in record.get("messages") or record["conversations"]:
            if message.get("role", message.get("from")) in ("assistant", "gpt"):
                message.update(rng.choice(CHOICES))
    path = tmp_path_factory.mktemp("weighted") / "weighted.jsonl"
    write_jsonl(path, records)
    return records, path


@pytest.fixture(scope="module")
def oracle_samples(weighted) -> dict[str, list[tuple[list[int], int]]]:
    tokenizer = reference_tokenizer()
    return {record["id"]: contract_samples(record, tokenizer, "reasoning_content") for record in weighted[0]}


@pytest.mark.parametrize("train_on", ["all", "last"])
@pytest.mark.parametrize("normalization", ["token", "turn", "conversation"])
def test_rows_train_each_sample_with_the_oracles_weight(normalization, train_on, weighted, oracle_samples):
    records, source = weighted
    out = converted(f"loss-{normalization}-{train_on}", "--max-seq-len", "4096",
                    "--loss-normalization", normalization, "--train-on", train_on, source=source)
    expected, units, untrainable = Counter(), {}, set()
    for record in records:
        pairs, units[record["id"]] = weighted_pairs(
            oracle_samples[record["id"]], message_weights(record, train_on), normalization
        )
        expected += pairs
        if not pairs:
            untrainable.add(record["id"])
    found = rows(out)
    assert sum((one_pass_pairs(row, with_weight=True) for row in found), Counter()) == expected
    for row in found:
        assert row["loss_units"] == sum(units[i] for i in row["conversation_ids"])
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {(r["id"], r["kind"]) for r in rejected} == {(i, "nothing-to-train") for i in untrainable}
    assert untrainable  # the seeded weights leave some chats with nothing to train
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["loss"] == {"normalization": normalization, "train_on": train_on}
    assert cli("verify", out, "--input", source).exit_code == 0


def test_train_on_last_duplicates_nothing(weighted):
    """One sample per conversation: each trains once and shares its context with nobody."""
    _, source = weighted
    out = converted("loss-last-plain", "--max-seq-len", "4096", "--train-on", "last", source=source)
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    for row in table.to_pylist():
        assert row["mask_spec"]["seg_parents"] == [-1] * len(row["conversation_ids"])  # a chain each
        assert row["num_tokens"] == row["n_pass_tokens"]
