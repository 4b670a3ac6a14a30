"""`onepass-prep check-model` on saved configs (a window model is exact, a hybrid is refused,
transformers' own stock configs each give a verdict table or one line) and `verify
--model-check` running the tokenizer folder's own architecture."""

from __future__ import annotations

import re
import shutil

import huggingface_hub
import pytest
import transformers as T
from helpers.paths import SAMPLE
from helpers.runs import cli

from onepass_prep.convert.tokenizer import qwen_tokenizer_dir

IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "onepass_tree")


def lines(output: str) -> dict[str, str]:
    """implementation (or footnote marker) -> the rest of its line, footnotes written out."""
    out = {}
    for line in output.splitlines():
        name, _, rest = line.partition(" ")
        out[name] = rest.strip()
    for name in IMPLEMENTATIONS:
        marker = re.search(r"(\[\d+\])$", out.get(name, ""))
        if marker:
            out[name] = out[name].replace(marker.group(1), out[marker.group(1)])
    return out


def test_a_window_model_is_exact_through_every_implementation(tmp_path) -> None:
    T.Gemma3TextConfig(sliding_window=512, sliding_window_pattern=3).save_pretrained(tmp_path)
    result = cli("check-model", tmp_path, columns=400)
    assert result.exit_code == 0, result.output
    assert (
        "layers of the tiny model: 2 x sliding window 5, full attention "
        "(sliding window shrunk from 512 to 5 tokens for the test)"
    ) in result.output
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


# transformers' own default configs (AutoConfig.for_model), as a user saves them: dense, MoE,
# MLA, windows, chunks, sinks, multimodal text configs, encoder-style and hybrid families.
STOCK = (
    "qwen3", "llama", "gemma2", "gemma3_text", "gpt_oss", "olmo3", "llama4_text", "deepseek_v3",
    "qwen3_moe", "mixtral", "bert", "gpt2", "qwen3_next", "qwen3_5_text", "nemotron_h", "lfm2",
    "lfm2_moe", "granitemoehybrid", "falcon_h1", "jamba", "bamba", "minimax", "olmo_hybrid",
    "mamba", "mistral4",
)
# Families whose verdicts change as the runtime learns their mixers: only the shape is asserted.
VERDICT = re.compile(r"(exact|differs) +\S.*|(refused|not available) +\[\d+\]")


def test_every_stock_config_gives_a_verdict_per_implementation_or_one_line(tmp_path) -> None:
    outputs = {}
    for model_type in STOCK:
        T.AutoConfig.for_model(model_type).save_pretrained(tmp_path / model_type)
        result = cli("check-model", tmp_path / model_type, columns=1000)
        assert result.exception is None or isinstance(result.exception, SystemExit), (model_type, result.output)
        assert "Traceback" not in result.output and result.exit_code in (0, 1), (model_type, result.output)
        outputs[model_type] = result.output
        text = result.output.splitlines()
        if text[0].startswith("error: "):  # the model cannot be built: one short line
            assert len(text) == 1 and len(text[0]) < 300, (model_type, result.output)
            continue
        assert text[0].startswith("layers of the tiny model: "), (model_type, result.output)
        for name, line in zip(IMPLEMENTATIONS, text[1:5], strict=True):
            assert line.startswith(f"{name} ") and VERDICT.fullmatch(line[16:]), (model_type, result.output)
        notes = text[5:]  # each reason once, numbered in order of first use
        assert [n.split(" ")[0] for n in notes] == [f"[{i}]" for i in range(1, len(notes) + 1)], result.output
        assert len(set(notes)) == len(notes)
    got = {model_type: lines(output) for model_type, output in outputs.items()}
    for model_type in ("qwen3", "llama", "olmo3", "llama4_text", "deepseek_v3", "qwen3_moe", "mixtral"):
        assert all(got[model_type][name].startswith("exact ") for name in IMPLEMENTATIONS), outputs[model_type]
    assert "(sliding window shrunk from 4096 to 5 tokens for the test)" in outputs["olmo3"]
    assert "(attention chunk shrunk from 8192 to 6 tokens for the test)" in outputs["llama4_text"]
    # a limitation of tree attention is a refusal, not the machine's
    assert got["gpt_oss"]["onepass_tree"].startswith("refused       'onepass_tree' attention has no attention sinks")
    assert got["gpt_oss"]["eager"].startswith("exact ")
    # an error inside transformers under one implementation leaves the others' verdicts
    assert got["lfm2"]["flex_attention"].startswith("not available the one-pass run fails: AttributeError")
    assert got["lfm2"]["eager"].startswith("exact ")
    # a bidirectional model (BERT without is_decoder) is refused by the hook, never compared
    assert all(
        got["bert"][name].startswith("refused") and "bidirectional self-attention, is_causal false" in got["bert"][name]
        for name in IMPLEMENTATIONS
    ), outputs["bert"]
    # a long refusal is printed once
    assert outputs["jamba"].count("cannot train on tree rows exactly") == 1, outputs["jamba"]
    assert outputs["mistral4"] == "error: transformers has no causal language model for 'mistral4' (Mistral4Config)\n"


def test_a_missing_folder_is_named_and_an_unreachable_hub_fails_at_once(tmp_path, monkeypatch) -> None:
    result = cli("check-model", tmp_path / "no" / "such-model")
    assert result.exit_code == 1
    assert result.output == f"error: {tmp_path / 'no' / 'such-model'}: no such file or folder\n"
    assert isinstance(cli("check-model", tmp_path / "no", "--debug").exception, ValueError)  # the traceback
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    result = cli("check-model", "someone/some-model", columns=300)
    assert result.exit_code == 1
    assert result.output.startswith(
        "error: someone/some-model: no such folder here, and the model hub cannot be reached (127.0.0.1: "
    ), result.output
