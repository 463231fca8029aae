"""wagpt/hf_gpt2.py: a transformers GPT-2 folder loads into our GPT with HF's logits, export ->
import -> export is the identity bit for bit, and what model.py cannot represent is refused by
name. Nothing here reaches the hub: the models are tiny random GPT2LMHeadModels saved to tmp
folders."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import export_hf
from export_hf import ExportConfig
from model import GPT, GPTConfig
from wagpt import checkpoint, hf_gpt2
from wagpt.hf_gpt2 import PretrainedLoadError

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models

REPO = Path(__file__).resolve().parent.parent


def tiny_hf(seed=0, **config):
    """A random GPT2LMHeadModel, every weight perturbed (biases, LayerNorm gains != 1) so that a
    mapping which drops, misplaces or mis-transposes any tensor changes the logits."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                    activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    bos_token_id=None, eos_token_id=None)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**settings, **config})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


def ours_from(state, model_args):
    model = GPT(GPTConfig(**model_args)).eval()
    checkpoint.load_model_state(model, state, "test")   # as train.build loads a checkpoint
    return model


def logits(model, hf, T=32):
    idx = torch.randint(0, hf.config.vocab_size, (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(idx, targets=idx)[0], hf(idx).logits


def test_local_folder_loads_with_hf_logits(tmp_path, capsys):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path / "hf")
    assert hf_gpt2.is_pretrained_source(str(tmp_path / "hf"))
    state, model_args = hf_gpt2.load_pretrained(str(tmp_path / "hf"))
    assert model_args == dict(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32,
                              dropout=0.0, bias=True)
    assert all(t.dtype == torch.float32 for t in state.values())
    ours, theirs = logits(ours_from(state, model_args), hf)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)   # float32 rounding
    assert "note" not in capsys.readouterr().out                     # 'gelu': nothing to say

    # the record train.py's --init_from consumes: the one reader takes the folder
    record = checkpoint.read_checkpoint(tmp_path / "hf")
    info = {"step": record.step, "tokens_seen": record.tokens_seen, "model_args":
            record.model_args, "optimizer": record.optimizer, "averaging": record.averaging}
    assert info == {"step": 0, "tokens_seen": 0, "model_args": model_args, "optimizer": None,
                    "averaging": None}
    assert record.weights.keys() == state.keys()
    assert checkpoint.read_checkpoint(tmp_path / "hf").model_args == model_args


def test_gpt2_tanh_gelu_loads_into_the_exact_gelu(tmp_path, capsys):
    """The released GPT-2 uses 'gelu_new' (tanh); model.py the erf GELU, as nanoGPT. The import
    is still exact on the weights; the logits move by the GELU difference (<= 4.7e-4 per
    activation), not by a mapping error (O(1))."""
    hf = tiny_hf(activation_function="gelu_new")
    hf.save_pretrained(tmp_path / "hf")
    state, model_args = hf_gpt2.load_pretrained(str(tmp_path / "hf"))
    assert "tanh GELU approximation ('gelu_new')" in capsys.readouterr().out
    ours, theirs = logits(ours_from(state, model_args), hf)
    difference = (ours - theirs).abs().max().item()
    assert 1e-6 < difference < 2e-3
    exact = tiny_hf(activation_function="gelu")          # the same weights with the erf GELU
    torch.testing.assert_close(ours, logits(ours_from(state, model_args), exact)[1],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_export_import_export_is_bitwise(bias, tiny_data_dir, tmp_path):
    torch.manual_seed(0)
    vocab = json.loads((tiny_data_dir / "meta.json").read_text())["vocab_size"]
    args = dict(block_size=16, vocab_size=vocab, n_layer=2, n_head=2, n_embd=16, dropout=0.0,
                bias=bias)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    first = export_hf.export(ExportConfig(
        ckpt=str(checkpoint.save_snapshot(tmp_path / "a", model, 5, 80, args)),
        out_dir=str(tmp_path / "hf1"), data_dir=str(tiny_data_dir)))

    record = checkpoint.read_checkpoint(first)
    state, info = record.weights, {"model_args": record.model_args}
    assert info["model_args"] == args                     # bias=False comes back as bias=False
    imported = ours_from(state, info["model_args"])
    for name, tensor in checkpoint.model_state(model).items():
        assert torch.equal(checkpoint.model_state(imported)[name], tensor), name

    second = export_hf.export(ExportConfig(
        ckpt=str(checkpoint.save_snapshot(tmp_path / "b", imported, 5, 80, info["model_args"])),
        out_dir=str(tmp_path / "hf2"), data_dir=str(tiny_data_dir)))
    for name in ("model.safetensors", "config.json", "meta.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


@pytest.mark.parametrize("config, message", [
    (dict(n_inner=100), "n_inner=100"),
    (dict(activation_function="relu"), "activation_function='relu'"),
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon=1e-06"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(tie_word_embeddings=False), "not tied"),
])
def test_what_model_py_cannot_represent_is_refused(config, message, tmp_path):
    hf = tiny_hf(**config)
    with pytest.raises(PretrainedLoadError, match=message):
        hf_gpt2.from_hf_model(hf, "folder X")


def test_bad_sources(tmp_path):
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        assert hf_gpt2.is_pretrained_source(name)
    for value in ("scratch", "resume", "", str(tmp_path / "ckpt_0000100.pt"), "gpt3"):
        assert not hf_gpt2.is_pretrained_source(value)
    with pytest.raises(PretrainedLoadError, match="not a folder; give one of gpt2, gpt2-medium"):
        hf_gpt2.load_pretrained(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedLoadError, match="config.json is missing"):
        hf_gpt2.load_pretrained(str(tmp_path / "empty"))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(PretrainedLoadError, match="model_type='llama'"):
        hf_gpt2.load_pretrained(str(tmp_path / "llama"))
    tiny_hf().config.save_pretrained(tmp_path / "no_weights")
    with pytest.raises(PretrainedLoadError, match="transformers cannot load the folder"):
        hf_gpt2.load_pretrained(str(tmp_path / "no_weights"))


def test_hub_name_offline_is_one_line_naming_the_id_and_the_fix(tmp_path):
    """HF_HUB_OFFLINE with an empty cache: what a machine without the hub sees, at once."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "PYTHONPATH": str(REPO)}
    code = ("from wagpt import hf_gpt2\n"
            "try:\n    hf_gpt2.load_pretrained('gpt2-xl')\n"
            "except hf_gpt2.PretrainedLoadError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and len(lines) == 1, result.stdout + result.stderr
    message = lines[0]
    assert message.startswith("gpt2-xl: could not load openai-community/gpt2-xl "
                              "from the local Hugging Face cache (offline mode is set)")
    assert ("`hf download openai-community/gpt2-xl config.json model.safetensors --local-dir "
            "gpt2-xl`" in message and message.endswith("give ./gpt2-xl instead"))
