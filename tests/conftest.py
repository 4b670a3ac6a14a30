import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/reference.py

from transformers import AutoTokenizer  # noqa: E402

from onepass_prep.tokenizer import LoadedTokenizer, load_tokenizer, qwen_tokenizer_dir  # noqa: E402

SAMPLE = ROOT / "sample_data" / "chats.jsonl"
TEMPLATES = Path(__file__).resolve().parent / "templates"


@pytest.fixture(scope="session")
def qwen() -> LoadedTokenizer:
    return load_tokenizer("qwen")


def reference_tokenizer(template: Path | None = None):
    """What a trainer would load: `AutoTokenizer`, not the converter's loading code."""
    tokenizer = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))
    if template is not None:
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    return tokenizer


@pytest.fixture(scope="session")
def sample_path() -> Path:
    return SAMPLE
