"""Tokenize the 2N renderings of a conversation at about the cost of tokenizing it once.

The renderings share most of their text. A fast tokenizer first cuts its input at added
tokens (`<|im_start|>`, `<think>`, …) and then tokenizes every piece in between on its
own, so each distinct piece needs tokenizing once per conversation, and a rendering's ids
are its pieces' ids joined. That equivalence needs added tokens that match raw text
exactly (no lstrip/rstrip/single_word/normalized) and a pre-tokenizer that does not care
where a piece sits in the input (no Metaspace); for any other tokenizer we tokenize every
rendering whole.

Either way the tokenizer's `encode_batch_fast` does the work: the same ids as
`encode_batch`, without the character offsets that nothing here reads (a quarter of the
tokenizer's time on the benchmark chats, docs/benchmarks.md).
"""

from __future__ import annotations

import re

import numpy as np
from tokenizers import Tokenizer


class PieceEncoder:
    def __init__(self, backend: Tokenizer):
        self.backend = backend
        added = backend.get_added_tokens_decoder()
        self.piecewise = (
            bool(added)
            and not backend.encode_special_tokens
            and "Metaspace" not in repr(backend.pre_tokenizer)
            and not any(t.lstrip or t.rstrip or t.single_word or t.normalized for t in added.values())
        )
        # The most characters one token stands for (a byte-level vocabulary writes one
        # character per byte); with NFC's composition (at most 4 characters into 1, e.g.
        # u + diaeresis + macron), a text of n characters has at least n / (4 * this) tokens.
        self.max_token_chars = max(len(token) for token in backend.get_vocab(with_added_tokens=True))
        # Ids of the pieces that need no tokenizing: added tokens, and the empty text.
        self.fixed_ids = {t.content: np.asarray([i], dtype=np.int32) for i, t in added.items()}
        self.fixed_ids[""] = np.zeros(0, dtype=np.int32)
        # Longest first: the leftmost-longest match the tokenizer itself makes.
        contents = sorted((token.content for token in added.values()), key=len, reverse=True)
        self.splitter = re.compile("(" + "|".join(map(re.escape, contents)) + ")") if added else None

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on the tokens of `text`, known without tokenizing it."""
        return len(text) // (4 * self.max_token_chars)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        if not self.piecewise or self.splitter is None:
            encoded = self.backend.encode_batch_fast(texts, add_special_tokens=False)
            return [np.asarray(encoding.ids, dtype=np.int32) for encoding in encoded]
        split_texts = [self.splitter.split(text) for text in texts]
        distinct = list({piece for parts in split_texts for piece in parts[0::2] if piece})
        encoded = self.backend.encode_batch_fast(distinct, add_special_tokens=False)
        ids = {piece: np.asarray(e.ids, dtype=np.int32) for piece, e in zip(distinct, encoded, strict=True)}
        ids.update(self.fixed_ids)
        return [np.concatenate([ids[piece] for piece in parts]) for parts in split_texts]
