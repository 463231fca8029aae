"""
Sample text from any checkpoint (the files evaluate.load_model reads).

    python sample.py --ckpt=out/shakespeare_char/ckpt_0002000.pt --prompt="ROMEO:"
    python sample.py --ckpt=out/run/averaged/ema/step_0002000.safetensors --num_samples=3
    python sample.py --ckpt=out/owt/ckpt_0600000.pt --prompt=FILE:prompt.txt --top_k=50

The tokenizer: a model with a GPT-2-sized vocabulary (>= 50257) uses GPT-2 BPE (tiktoken, with
data/common.py's offline fallback); a smaller one is character level, its characters taken from
the `chars` of the dataset's meta.json (--dataset / --data_dir, as train.py).
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from configurator import load_config
from evaluate import load_model
from train import REPO, init_runtime

GPT2_VOCAB_SIZE = 50257   # GPT-2 BPE's 50256 merges and bytes + <|endoftext|>


@dataclass
class SampleConfig:
    ckpt: str = ""                 # the weights: ckpt_*.pt, *.safetensors or a nanoGPT .pt
    prompt: str = "\n"             # text to continue, or FILE:path to read it from a file
    num_samples: int = 1
    max_new_tokens: int = 200
    temperature: float = 0.8       # < 1 sharpens the distribution, 0 = greedy
    top_k: int | None = 200        # sample among the k most likely tokens only (None: all)
    seed: int = 1337               # the same seed, checkpoint and device give the same text
    dataset: str = "shakespeare_char"  # where a char-level model's meta.json lives ...
    data_dir: str | None = None    # ... or an explicit path
    device: str = "auto"
    dtype: str = "auto"            # 'auto' = bf16 autocast on CUDA

    def __post_init__(self):
        if not self.ckpt:
            raise ValueError("ckpt is not set: --ckpt=out/<run>/ckpt_0002000.pt (or a snapshot)")
        for key in ("num_samples", "max_new_tokens"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k={self.top_k} must be > 0, or None for no cut-off")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")


class CharTokenizer:
    """Id i is chars[i] (data/common.py's meta.json layout)."""

    def __init__(self, chars, source):
        self.chars, self.source = chars, source
        self.index = {c: i for i, c in enumerate(chars)}

    def encode(self, text):
        for c in text:
            if c not in self.index:
                raise ValueError(f"prompt character {c!r} (U+{ord(c):04X}) is not in the "
                                 f"vocabulary of {self.source} ({len(self.chars)} characters: "
                                 f"{''.join(self.chars)!r}); change the prompt")
        return [self.index[c] for c in text]

    def decode(self, ids):
        # a padding row past the vocabulary is no character (U+FFFD marks one if ever sampled)
        return "".join(self.chars[i] if i < len(self.chars) else "\ufffd" for i in ids)


class GPT2BPETokenizer:
    def __init__(self):
        from data.common import gpt2_encoding   # tiktoken, else the pinned offline ranks
        self.encoding = gpt2_encoding()

    def encode(self, text):
        return self.encoding.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids):
        # ids past 50256 are the padding rows of a 50304 vocab: no text (U+FFFD marks one);
        # bytes are joined before decoding, as a character may span several tokens
        pieces = [self.encoding.decode_single_token_bytes(i) if i < self.encoding.n_vocab
                  else "\ufffd".encode() for i in ids]
        return b"".join(pieces).decode("utf-8", errors="replace")


def data_meta(dataset, data_dir):
    """(meta.json dict or None, its path) of the dataset train.py would open."""
    directory = Path(data_dir) if data_dir else REPO / "data" / dataset
    path = directory / "meta.json"
    return (json.loads(path.read_text()) if path.is_file() else None), path


def load_tokenizer(vocab_size, dataset="shakespeare_char", data_dir=None):
    """The tokenizer of a model with `vocab_size` rows (see the module docstring)."""
    if vocab_size >= GPT2_VOCAB_SIZE:
        return GPT2BPETokenizer()
    meta, path = data_meta(dataset, data_dir)
    if meta is None or meta.get("tokenizer") != "char" or "chars" not in meta:
        found = "is missing" if meta is None else f"has tokenizer {meta.get('tokenizer')!r}"
        raise ValueError(f"the model has a {vocab_size}-token vocabulary, so it is character "
                         f"level, but {path} {found}; pass the dataset it was trained on "
                         f"(--dataset=NAME or --data_dir=PATH, whose meta.json lists its chars)")
    if len(meta["chars"]) > vocab_size:
        raise ValueError(f"{path} lists {len(meta['chars'])} characters but the model has only "
                         f"{vocab_size} tokens: it was trained on another dataset; pass that one")
    return CharTokenizer(meta["chars"], path)


def sample(cfg):
    """Print and return cfg.num_samples continuations of the prompt (prompt included)."""
    runtime = init_runtime(cfg)
    model, info = load_model(cfg.ckpt, runtime.device)
    tokenizer = load_tokenizer(info["model_args"]["vocab_size"], cfg.dataset, cfg.data_dir)
    prompt = cfg.prompt
    if prompt.startswith("FILE:"):
        prompt = Path(prompt[len("FILE:"):]).read_text(encoding="utf-8")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty; give at least one character (the default is a "
                         "newline)")
    x = torch.tensor([ids], dtype=torch.long, device=runtime.device)
    torch.manual_seed(cfg.seed)
    texts = []
    for _ in range(cfg.num_samples):
        with runtime.autocast():
            y = model.generate(x, cfg.max_new_tokens, cfg.temperature, cfg.top_k)
        texts.append(tokenizer.decode(y[0].tolist()))
        print(texts[-1])
        print("---------------")
    return texts


if __name__ == "__main__":
    sample(load_config(SampleConfig, sys.argv[1:]))
