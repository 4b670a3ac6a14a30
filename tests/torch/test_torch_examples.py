"""The training examples run as documented, on two short converted chats (the plain token
mean, and the conversation mean with the last turn trained)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.paths import ROOT
from typer.testing import CliRunner

from onepass_prep.cli import app
from onepass_prep.torch import OnePassDataset

EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def out_dirs(tmp_path_factory: pytest.TempPathFactory, sample_path: Path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("examples")
    lines = [
        line for line in sample_path.read_text(encoding="utf-8").splitlines()
        if json.loads(line)["id"] in ("math-005", "sharegpt-001")
    ]
    (tmp / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    options = {"token": [], "conversation": ["--loss-normalization", "conversation", "--train-on", "last"]}
    for name, extra in options.items():
        result = CliRunner().invoke(
            app, ["convert", str(tmp / "chats.jsonl"), "--model", "qwen", "-o", str(tmp / name), *extra]
        )
        assert result.exit_code == 0, result.output
    return {name: tmp / name for name in options}


@pytest.mark.parametrize(
    ("name", "data", "steps"),
    [("train_plain", "token", None), ("train_plain", "conversation", 1), ("train_trainer", "conversation", 1),
     ("train_sft", "conversation", 1)],
)
def test_example_trains(name: str, data: str, steps: int | None, out_dirs: dict[str, Path], tmp_path: Path) -> None:
    """None: the example's default steps (3, with --accumulation 2), which the plain loop
    runs over as many epochs as the data's one row needs, and says so."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}  # the Arrow copy of the shards
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), str(out_dirs[data]), *(["--steps", str(steps)] if steps else [])],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loss" in done.stdout
    if steps is None:
        rows = len(OnePassDataset(out_dirs[data]))
        assert rows == 1 and "1 row per epoch, 2 per step (--accumulation): 1 step per epoch" in done.stdout
        assert "3 steps over 3 epochs" in done.stdout
        assert [line.split(":")[0] for line in done.stdout.splitlines() if ": loss " in line] == [
            f"epoch {step} step {step}" for step in range(3)
        ]
