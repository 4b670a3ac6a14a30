"""Piecewise tokenization must give exactly the ids of tokenizing each text whole, and
so must the encoder's whole-text path (for tokenizers it cannot cut into pieces): both
against the tokenizer's ordinary `encode`."""

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onepass_prep.convert.encode import PieceEncoder

FRAGMENTS = [
    "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "<|im_", "<thi", "think>",
    "\n", "\n\n", "  ", " ", "\u0301", "é", "e\u0301", "数学", "🙂", "'s", "123", "\t", "<", ">",
]
texts = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8)), max_size=25
).map("".join)


@pytest.fixture(scope="module")
def encoder(qwen):
    return PieceEncoder(qwen.tokenizer.backend_tokenizer)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(texts, min_size=1, max_size=4))
def test_piecewise_ids_equal_whole_text_ids(encoder, batch):
    assert encoder.piecewise
    whole = [encoder.backend.encode(t, add_special_tokens=False).ids for t in batch]
    assert [ids.tolist() for ids in encoder.encode(batch)] == whole
    unsplit = copy.copy(encoder)
    unsplit.piecewise = False
    assert [ids.tolist() for ids in unsplit.encode(batch)] == whole
