import pytest
import torch


@pytest.fixture(autouse=True)
def no_onednn():
    """oneDNN re-plans every new sequence length on CPU, which made tiny models 100x slower."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled


@pytest.fixture(scope="session")
def tokenizer():
    """SFTTrainer insists on a tokenizer object; the bundled offline Qwen one does."""
    from onepass_prep.convert.tokenizer import load_tokenizer

    return load_tokenizer("qwen").tokenizer
