"""export_hf.py: the exported GPT2LMHeadModel computes our logits (bias or not, from a snapshot,
an averaged snapshot or a .pt), and the GPT-2 tokenizer rebuilt from tiktoken's ranks encodes
exactly as tiktoken does."""

import json

import pytest
import tiktoken
import torch
import transformers

import export_hf
from export_hf import ExportConfig
from model import GPT, GPTConfig
from wagpt import checkpoint
from wagpt.corpora import offline_gpt2_encoding
from wagpt.errors import CheckpointError, UserError

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models


def random_model(bias, vocab_size=40, seed=0):
    """A model whose every weight is non-trivial (random biases, LayerNorm gains != 1), so a
    mapping that drops or misplaces any tensor changes the logits."""
    torch.manual_seed(seed)
    args = dict(block_size=16, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=16,
                dropout=0.0, bias=bias)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, args


def exported_logits_match(model, out_dir):
    hf = transformers.GPT2LMHeadModel.from_pretrained(out_dir).eval()
    idx = torch.randint(0, model.config.vocab_size, (3, model.config.block_size),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model.eval()(idx, targets=idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    return hf


@pytest.mark.parametrize("bias", [False, True])
def test_snapshot_export_has_our_logits(bias, tiny_data_dir, tmp_path):
    model, args = random_model(bias, vocab_size=json.loads(
        (tiny_data_dir / "meta.json").read_text())["vocab_size"])
    snapshot = checkpoint.save_snapshot(tmp_path / "snap", model, 8, 512, args)
    out = export_hf.export(ExportConfig(ckpt=str(snapshot), out_dir=str(tmp_path / "hf"),
                                        data_dir=str(tiny_data_dir)))
    hf = exported_logits_match(model, out)
    config = hf.config
    assert (config.activation_function, config.layer_norm_epsilon) == ("gelu", 1e-5)
    assert (config.n_positions, config.vocab_size, config.n_layer) == (16, args["vocab_size"], 2)
    chars = json.loads((tiny_data_dir / "meta.json").read_text())["chars"]
    assert config.tie_word_embeddings and config.eos_token_id == chars.index("\n")
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    assert (out / "model.safetensors").is_file()
    if not bias:   # HF's GPT-2 always has biases: ours are zero
        assert not hf.transformer.h[0].attn.c_attn.bias.any()
        assert not hf.transformer.ln_f.bias.any()
    # character level: our chars beside the weights, and a transformers tokenizer of them
    assert json.loads((out / "meta.json").read_text())["chars"] == chars
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "to be or not\n  the king"
    assert tokenizer(text)["input_ids"] == [chars.index(c) for c in text]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token == tokenizer.pad_token == "\n" and tokenizer.model_max_length == 16
    with pytest.raises(Exception, match="Missing"):   # a character outside: an error, no drop
        tokenizer("to be? or not")


def test_averaged_snapshot_and_pt_exports(tiny_data_dir, tmp_path):
    """An averaged snapshot is a snapshot with averager metadata; a nanoGPT .pt works too."""
    model, args = random_model(True, vocab_size=40, seed=3)
    averaged = checkpoint.save_snapshot(tmp_path / "averaged" / "ema", model, 8, 512, args,
                                        extra={"averager": "ema", "hparams": {"ema_decay": 0.9}})
    with pytest.raises(UserError, match="no_data"):   # a character-level model needs its chars
        export_hf.export(ExportConfig(ckpt=str(averaged), out_dir=str(tmp_path / "hf_ema"),
                                      data_dir=str(tmp_path / "no_data")))
    assert not (tmp_path / "hf_ema").exists()   # refused before anything is written
    exported_logits_match(model, export_hf.export(ExportConfig(
        ckpt=str(averaged), out_dir=str(tmp_path / "hf_ema"), data_dir=str(tiny_data_dir))))
    nano = tmp_path / "ckpt.pt"
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in checkpoint.model_state(model).items()},
                "model_args": args, "iter_num": 8}, nano)
    exported_logits_match(model, export_hf.export(ExportConfig(
        ckpt=str(nano), out_dir=str(tmp_path / "hf_nano"), data_dir=str(tiny_data_dir))))


def tiny_bpe():
    """A tiktoken encoding with 256 bytes and a handful of merges: a BPE in miniature."""
    ranks = {bytes([b]): b for b in range(256)}
    for token in [b"th", b"he", b" t", b"the", b" the", b"in", b"ing", b" th", b"en", b"then"]:
        ranks[token] = len(ranks)
    from tiktoken_ext.openai_public import r50k_pat_str
    return tiktoken.Encoding(name="tiny", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


def test_tiktoken_ranks_to_hf_tokenizer():
    encoding = tiny_bpe()
    tokenizer = export_hf.hf_tokenizer(encoding)
    text = "then the thing, thin theme!\n\n  they think <|endoftext|> ünïcode 日本"
    expected = encoding.encode(text, allowed_special="all")
    assert tokenizer(text)["input_ids"] == expected
    assert tokenizer.decode(expected) == text
    vocab, merges = export_hf.gpt2_vocab_and_merges({b"a": 0, b"b": 1, b"ab": 2, b" ab": 4,
                                                     b" ": 3})
    assert merges == [("a", "b"), ("Ġ", "ab")] and vocab["Ġab"] == 4   # GPT-2 shows " " as Ġ
    with pytest.raises(ValueError, match="is not one merge of lower ranks"):
        export_hf.gpt2_vocab_and_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})


def test_gpt2_vocab_export_with_tokenizer(tmp_path, monkeypatch):
    # the pinned ranks from the openai-whisper sdist on PyPI (fetched once, sha256-checked);
    # tiktoken's own download is never attempted
    encoding = offline_gpt2_encoding()
    monkeypatch.setattr("wagpt.corpora.gpt2_encoding", lambda *args: encoding)  # never download
    model, args = random_model(False, vocab_size=50304)     # padded as train_small.py
    snapshot = checkpoint.save_snapshot(tmp_path / "snap", model, 1, 1, args)
    out = export_hf.export(ExportConfig(ckpt=str(snapshot), out_dir=str(tmp_path / "hf")))
    hf = exported_logits_match(model, out)
    assert hf.config.eos_token_id == hf.config.bos_token_id == 50256
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "ROMEO: But soft, what light through yonder window breaks?\n\nIt is the east 123"
    assert tokenizer(text)["input_ids"] == encoding.encode(text)
    assert tokenizer.eos_token_id == 50256 and tokenizer.model_max_length == 16


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors does not exist"):
        export_hf.export(ExportConfig(ckpt=str(tmp_path / "nope.safetensors"),
                                      out_dir=str(tmp_path / "hf")))
    assert not (tmp_path / "hf").exists()
