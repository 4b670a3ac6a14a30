"""sample_data converted by the CLI, trained through the runtime, against N-pass references.

Three short conversations (reasoning in a field, inline, ShareGPT) keep this small: a plain loop over
the packed output (one row, several roots) and Trainer/SFTTrainer over the unpacked output
(one conversation per row and per step).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers.reference import READS, contract_samples, reference_tokenizer
from helpers.torch_models import gradients, n_pass, summed_loss
from helpers.trainers import compare_runs
from transformers import AutoModelForCausalLM, Qwen3Config
from typer.testing import CliRunner

from onepass_prep.cli import app
from onepass_prep.torch import OnePassCollator, OnePassDataset, install_mask_hook

CHOSEN = ["math-005", "chat-001", "sharegpt-001"]  # in file order
CONFIG = Qwen3Config(
    vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.3,
)


def tiny_qwen3() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(copy.deepcopy(CONFIG), attn_implementation="sdpa")


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, sample_path: Path) -> dict:
    """The chosen chats converted packed and unpacked, and their N-pass samples."""
    tmp = tmp_path_factory.mktemp("e2e")
    lines = [
        line for line in sample_path.read_text(encoding="utf-8").splitlines()
        if json.loads(line)["id"] in CHOSEN
    ]
    subset = tmp / "subset.jsonl"
    subset.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = {}
    for name, extra in (("packed", []), ("unpacked", ["--no-pack"])):
        result = CliRunner().invoke(
            app, ["convert", str(subset), "--model", "qwen", "-o", str(tmp / name), *extra]
        )
        assert result.exit_code == 0, result.output
        out[name] = tmp / name
    tokenizer = reference_tokenizer()
    out["chats"] = [contract_samples(json.loads(line), tokenizer, READS[None]) for line in lines]
    out["tokenizer"] = tokenizer
    return out


def test_plain_loop_over_packed_output_equals_n_passes(converted, tmp_path: Path) -> None:
    dataset = OnePassDataset(converted["packed"], cache_dir=tmp_path)
    assert len(dataset) == 1 and len(dataset[0]["mask_spec"]["seg_parents"]) > 3
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=OnePassCollator())
    model = tiny_qwen3()
    handle = install_mask_hook(model)
    one = sum(summed_loss(model(**batch).logits, batch["labels"]) for batch in loader)
    one_grads = gradients(model, one)
    handle.remove()
    samples = [s for chat in converted["chats"] for s in chat]
    reference = n_pass(model, samples)
    reference_grads = gradients(model, reference)
    torch.testing.assert_close(one, reference, rtol=1e-5, atol=0)
    for name, grad in reference_grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(one_grads[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_trainers_over_unpacked_output_follow_n_pass_run(converted, kind: str, tmp_path: Path) -> None:
    folder = converted["unpacked"]
    assert _conversation_ids(folder) == [[c] for c in CHOSEN]  # one conversation per row, in input order
    compare_runs(
        kind, folder, converted["chats"], tiny_qwen3, tmp_path, OnePassCollator(pad_to_multiple_of=16),
        converted["tokenizer"],
    )


def _conversation_ids(folder: Path) -> list[list[str]]:
    return [
        ids for path in sorted(folder.glob("part-*.parquet"))
        for ids in pq.read_table(path, columns=["conversation_ids"]).column(0).to_pylist()
    ]
