"""`onepass-prep check-model` on saved configs (a window model is exact, a hybrid is refused)
and `verify --model-check` running the tokenizer folder's own architecture."""

from __future__ import annotations

import shutil

import pytest
import transformers as T
from helpers.paths import SAMPLE
from helpers.runs import cli

from onepass_prep.convert.tokenizer import qwen_tokenizer_dir


def lines(output: str) -> dict[str, str]:
    """implementation -> the rest of its line."""
    out = {}
    for line in output.splitlines():
        name, _, rest = line.partition(" ")
        out[name] = rest.strip()
    return out


def test_a_window_model_is_exact_through_every_implementation(tmp_path) -> None:
    T.Gemma3TextConfig(sliding_window=512, sliding_window_pattern=3).save_pretrained(tmp_path)
    result = cli("check-model", tmp_path, columns=400)
    assert result.exit_code == 0, result.output
    assert "layers of the tiny model: 2 x sliding window 5, full attention" in result.output
    got = lines(result.output)
    for implementation in ("sdpa", "eager", "flex_attention", "onepass_tree"):
        assert got[implementation].startswith("exact "), result.output
        assert "163 token losses, largest difference" in got[implementation]


def test_tree_attention_says_why_not_and_what_to_use(tmp_path) -> None:
    T.Gemma2Config(sliding_window=512).save_pretrained(tmp_path)
    result = cli("check-model", tmp_path, columns=400)
    assert result.exit_code == 0, result.output
    got = lines(result.output)
    assert got["sdpa"].startswith("not available Gemma2ForCausalLM does not support an attention")
    assert got["eager"].startswith("exact ")
    assert got["onepass_tree"] == (
        "refused       'onepass_tree' attention has no logit softcapping, and Gemma2ForCausalLM caps "
        "its attention logits at 50.0: use install_mask_hook(model) with attn_implementation "
        "'eager' or 'flex_attention'"
    )


def test_a_hybrid_model_is_refused_everywhere(tmp_path) -> None:
    T.JambaConfig(num_hidden_layers=2, attn_layer_offset=1, attn_layer_period=2).save_pretrained(tmp_path)
    result = cli("check-model", tmp_path / "config.json", columns=600)
    assert result.exit_code == 1, result.output
    refusal = (
        "refused       JambaForCausalLM cannot train on tree rows exactly: layers linear_attention (runs "
        "JambaMambaMixer, which reads the row in order: its selective scan (transformers' "
        "mamba_selective_scan) takes no initial state"
    )
    got = lines(result.output)
    assert all(got[name].startswith(refusal) for name in ("sdpa", "eager", "onepass_tree")), result.output


def test_a_folder_without_a_config_is_one_line(tmp_path) -> None:
    result = cli("check-model", tmp_path)
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {tmp_path}: cannot read a model config")


def test_verify_model_check_runs_the_tokenizer_folders_architecture(tmp_path) -> None:
    """A model folder (tokenizer and config.json of a sliding-window model): the rows' losses
    through the runtime's per-layer masks equal the samples'."""
    model = tmp_path / "model"
    shutil.copytree(qwen_tokenizer_dir(), model)
    T.Cohere2Config(vocab_size=151936, sliding_window=4096).save_pretrained(model)
    source = tmp_path / "subset.jsonl"
    source.write_text("\n".join(SAMPLE.read_text(encoding="utf-8").splitlines()[:3]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert cli("convert", source, "--model", model, "-o", out).exit_code == 0
    result = cli("verify", out, "--input", source, "--model-check", columns=300)
    assert result.exit_code == 0, result.output
    assert "largest difference" in result.output and "(tiny random cohere2)" in result.output


def test_a_mask_that_misses_the_window_is_caught(tmp_path, monkeypatch) -> None:
    """The hook as it was (the tree mask on every layer): check-model says so and fails."""
    import onepass_prep.torch.hook as hook
    import onepass_prep.torch.tree_attention as tree_attention

    for module in (hook, tree_attention):
        monkeypatch.setattr(module, "key_limits", lambda position_ids, window, chunk: position_ids + 10**6)
    T.MistralConfig(sliding_window=4096).save_pretrained(tmp_path)
    result = cli("check-model", tmp_path, columns=400)
    assert result.exit_code == 1, result.output
    got = lines(result.output)
    assert all(got[name].startswith("differs") for name in ("sdpa", "eager", "flex_attention", "onepass_tree"))


@pytest.mark.parametrize("config, mixer", [
    (lambda: T.Qwen3_5TextConfig(num_hidden_layers=4), "Gated DeltaNet"),
    (lambda: T.NemotronHConfig(), "Mamba-2"),
])
def test_a_recurrent_hybrid_is_exact(tmp_path, config, mixer) -> None:
    """Recurrent mixers run from each chain's parent state (onepass_prep/torch/recurrent/)."""
    config().save_pretrained(tmp_path)
    result = cli("check-model", tmp_path, columns=400)
    assert result.exit_code == 0, result.output
    assert f"{mixer}, each chain from its parent's state" in result.output
    got = lines(result.output)
    for implementation in ("sdpa", "eager", "onepass_tree"):
        assert got[implementation].startswith("exact "), result.output
