from pathlib import Path

import pytest
from helpers.paths import SAMPLE

from onepass_prep.convert.tokenizer import LoadedTokenizer, load_tokenizer


@pytest.fixture(scope="session")
def qwen() -> LoadedTokenizer:
    return load_tokenizer("qwen")


@pytest.fixture(scope="session")
def sample_path() -> Path:
    return SAMPLE
