"""transformers.Trainer and TRL SFTTrainer through the mask hook (dense mask or tree attention)
follow the N-pass run.

Each step sees one conversation: the one-pass run its row, the reference run the batch of
its N-pass samples. Both trainers divide the summed loss by the step's trained-token count,
which is the same in both runs, so losses, gradients and updates must agree step by step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.torch_models import tiny_model
from helpers.torch_rows import chat_samples, pack, write_run
from helpers.trainers import compare_runs

from onepass_prep.torch import MaskKind, OnePassCollator


def synthetic_run(tmp_path_factory: pytest.TempPathFactory, version: int) -> tuple[Path, list]:
    """One conversation per row, in trainer order."""
    rng = np.random.default_rng(3)
    chats = [chat_samples(rng, turns) for turns in (3, 2, 4)]
    rows = [pack([chat], [f"c{i}"]) for i, chat in enumerate(chats)]
    folder = tmp_path_factory.mktemp("synthetic") / "run"
    return write_run(folder, rows, rows_per_shard=2, rows_per_group=1, version=version), chats


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    return synthetic_run(tmp_path_factory, 2)


@pytest.mark.parametrize("hook_kind", [None, "tree"], ids=["mask", "tree_attention"])
@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_trainer_follows_n_pass_run(kind: str, hook_kind: MaskKind | None, synthetic, tokenizer,
                                    tmp_path: Path) -> None:
    folder, chats = synthetic
    compare_runs(
        kind, folder, chats, lambda: tiny_model("qwen3", "sdpa"), tmp_path,
        OnePassCollator(pad_to_multiple_of=16), tokenizer, hook_kind,
    )


def test_v1_folder_trains_as_before(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """Format v1 (no loss columns): the plain Trainer, unchanged, follows the N-pass run."""
    folder, chats = synthetic_run(tmp_path_factory, 1)
    compare_runs(
        "trainer", folder, chats, lambda: tiny_model("qwen3", "sdpa"), tmp_path,
        OnePassCollator(pad_to_multiple_of=16),
    )
