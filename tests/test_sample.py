"""sample.py: deterministic continuations of the prompt, char-level and GPT-2 BPE decoding, and
clear errors for a prompt or dataset that does not fit the model."""

import json

import pytest
import torch

import sample
from model import GPT, GPTConfig
from sample import SampleConfig
from wagpt import checkpoint, tokenizer
from wagpt.configurator import load_config
from wagpt.corpora import offline_gpt2_encoding

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models


def save_random_model(directory, vocab_size, **overrides):
    """A snapshot of an untrained model: sampling needs weights, not good ones."""
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=16,
                dropout=0.0, bias=False, **overrides)
    return checkpoint.save_snapshot(directory, GPT(GPTConfig(**args)), 0, 0, args)


@pytest.fixture
def char_ckpt(tiny_data_dir, tmp_path):
    meta = json.loads((tiny_data_dir / "meta.json").read_text())
    return save_random_model(tmp_path / "snap", meta["vocab_size"])


def run(ckpt, data_dir, *args):
    argv = [f"--ckpt={ckpt}", f"--data_dir={data_dir}", "--device=cpu", "--max_new_tokens=20",
            *args]
    return sample.sample(load_config(SampleConfig, argv))


def test_samples_continue_the_prompt_and_repeat_with_the_seed(char_ckpt, tiny_data_dir, capsys):
    first = run(char_ckpt, tiny_data_dir, "--prompt=to be", "--num_samples=2")
    assert len(first) == 2 and first[0] != first[1]   # two draws, not one printed twice
    for text in first:
        assert text.startswith("to be") and len(text) == len("to be") + 20
    assert run(char_ckpt, tiny_data_dir, "--prompt=to be", "--num_samples=2") == first
    assert run(char_ckpt, tiny_data_dir, "--prompt=to be", "--seed=1") != first
    printed = capsys.readouterr().out
    assert first[0] in printed and "---------------" in printed
    # greedy: no randomness at all
    greedy = run(char_ckpt, tiny_data_dir, "--prompt=to be", "--temperature=0", "--seed=5")
    assert greedy == run(char_ckpt, tiny_data_dir, "--prompt=to be", "--temperature=0.0")


def test_prompt_from_a_file(char_ckpt, tiny_data_dir, tmp_path):
    (tmp_path / "prompt.txt").write_text("the king\n")
    (text,) = run(char_ckpt, tiny_data_dir, f"--prompt=FILE:{tmp_path / 'prompt.txt'}")
    assert text.startswith("the king\n")


def test_unknown_prompt_character(char_ckpt, tiny_data_dir):
    with pytest.raises(ValueError, match=r"prompt character 'Z' \(U\+005A\) is not in the "
                                         r"vocabulary of .*meta.json"):
        run(char_ckpt, tiny_data_dir, "--prompt=to Zed")


def test_char_model_needs_its_dataset(char_ckpt, tmp_path):
    with pytest.raises(ValueError, match="character level, but .*meta.json is missing; pass"):
        run(char_ckpt, tmp_path / "no_data")
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text(json.dumps({"tokenizer": "char", "chars": "abcdef",
                                                 "vocab_size": 6}))
    with pytest.raises(ValueError, match="lists 6 characters but the model has only 3 tokens"):
        tokenizer.load_tokenizer(3, data_dir=other)
    with pytest.raises(ValueError, match="temperature=-1"):
        load_config(SampleConfig, ["--ckpt=x.pt", "--temperature=-1"])


@pytest.fixture
def offline_gpt2(monkeypatch):
    """GPT-2 BPE from the local rank file only: tests never download."""
    # the pinned ranks from the openai-whisper sdist on PyPI (fetched once, sha256-checked);
    # tiktoken's own download is never attempted
    encoding = offline_gpt2_encoding()
    monkeypatch.setattr("wagpt.corpora.gpt2_encoding", lambda *args: encoding)
    return encoding


def test_gpt2_bpe_model(offline_gpt2, tmp_path):
    """A GPT-2-sized vocabulary (padded to 50304) samples through tiktoken, whatever dataset."""
    ckpt = save_random_model(tmp_path / "snap", 50304)
    texts = run(ckpt, tmp_path / "no_data", "--prompt=Hello world", "--top_k=None",
                "--temperature=2.0", "--num_samples=3")
    assert all(t.startswith("Hello world") for t in texts)
    bpe = tokenizer.GPT2BPETokenizer()
    assert bpe.encode("Hello world<|endoftext|>") == [15496, 995, 50256]
    # a padding row (50257..50303) is no token: it decodes to U+FFFD instead of failing
    assert bpe.decode([15496, 50300, 995]) == "Hello\ufffd world"
