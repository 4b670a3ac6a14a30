import pytest
import torch


@pytest.fixture(autouse=True)
def no_onednn():
    """oneDNN re-plans every new sequence length on CPU, which made tiny models 100x slower."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled
