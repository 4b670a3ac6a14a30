"""`inspect` and `stats` on a run whose conversations share trees (docs/inspect.md):
inspect names the conversations of a shared prefix and of each branch, stats reports the
tokens sharing saves apart from the one-pass layout's. Expected values come from the
input written here and pyarrow reads of the rows, not from the program's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.runs import cli, converted, rows


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five responses to one long prompt, and a chat that shares nothing with them."""
    prompt = {"role": "user", "content": "Prove it. " + "the sum of x and y is 42 " * 40}
    records = [{"id": f"answer-{k}", "messages": [prompt, {"role": "assistant", "content": f"reply number {k} " * 5}]}
               for k in range(5)]
    records.append({"id": "alone", "messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello"}]})
    path = tmp_path_factory.mktemp("shared") / "shared.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return converted("shared-views", source=path)


def test_inspect_names_the_shared_prefix_and_each_branch(shared_run):
    (row,) = rows(shared_run)
    assert sorted(row["conversation_ids"]) == ["alone", *[f"answer-{k}" for k in range(5)]]
    roots = [s for s, parent in enumerate(row["mask_spec"]["seg_parents"]) if parent == -1]
    assert len(roots) == 2  # the five answers' tree and the lone chat's
    result = cli("inspect", shared_run, "--row", "0", columns=160)
    assert result.exit_code == 0, result.output
    for k in range(5):
        assert f"answer-{k}" in result.output
    one = cli("inspect", shared_run, "--row", "0", "--conversation", "answer-3", columns=160)
    assert one.exit_code == 0, one.output
    assert "shared by 5" in one.output and "answer-3" in one.output
    assert "answer-4" not in one.output.split("shared by 5", 1)[1].split("\n", 1)[1]  # only its own branch
    owned = dict(zip(row["conversation_ids"], row["conversation_segments"], strict=True))
    shared = set.intersection(*(set(owned[f"answer-{k}"]) for k in range(5)))
    assert shared and all(len(owned[f"answer-{k}"]) > len(shared) for k in range(5))


def test_stats_reports_the_saving_of_sharing_apart(shared_run):
    result = cli("stats", shared_run, "--json")
    assert result.exit_code == 0, result.output
    tokens = json.loads(result.output)["tokens"]
    manifest = json.loads((shared_run / "manifest.json").read_text())["tokens"]
    assert tokens["unshared"] == manifest["unshared"] > tokens["one_pass"] == manifest["one_pass"]
    assert tokens["saving_by_sharing"] == pytest.approx(1 - manifest["one_pass"] / manifest["unshared"])
    assert tokens["saving_by_layout"] == pytest.approx(1 - manifest["unshared"] / manifest["n_pass"])
    table = cli("stats", shared_run, columns=120).output
    assert "by sharing prefixes" in table
