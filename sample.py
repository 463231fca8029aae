"""
Sample text from any checkpoint (the files checkpoint.load_model reads).

    python sample.py --ckpt=out/shakespeare_char/ckpt_0002000.pt --prompt="ROMEO:"
    python sample.py --ckpt=out/run/averaged/ema/step_0002000.safetensors --num_samples=3
    python sample.py --ckpt=out/owt/ckpt_0600000.pt --prompt=FILE:prompt.txt --top_k=50

The tokenizer (tokenizer.py): a model with a GPT-2-sized vocabulary (>= 50257) uses GPT-2 BPE
(tiktoken, with data/common.py's offline fallback); a smaller one is character level, its
characters those the checkpoint records of its training data, else the `chars` of the meta.json
of the dataset it records; --dataset / --data_dir name another (with the same characters).
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from wagpt.checkpoint import load_model
from wagpt.configurator import main
from wagpt.errors import ConfigError
from wagpt.runtime import check_dtype, init_runtime, teardown
from wagpt.tokenizer import checkpoint_tokenizer


@dataclass
class SampleConfig:
    ckpt: str = ""                 # the weights: ckpt_*.pt, *.safetensors or a nanoGPT .pt
    prompt: str = "\n"             # text to continue, or FILE:path to read it from a file
    start: str | None = None       # nanoGPT's name for prompt (the same values)
    num_samples: int = 1           # continuations to draw
    max_new_tokens: int = 200      # tokens generated per continuation
    temperature: float = 0.8       # < 1 sharpens the distribution, 0 = greedy
    top_k: int | None = 200        # sample among the k most likely tokens only (None: all)
    seed: int = 1337               # the same seed, checkpoint and device give the same text
    dataset: str | None = None     # a char-level model's characters: this dataset's meta.json
    data_dir: str | None = None    # ... or this folder's (None: the checkpoint's own)
    device: str = "auto"           # 'auto' (cuda if available) | 'cpu' | 'cuda' | 'cuda:1' ...
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
        check_dtype(self.dtype)
        if self.start is not None:
            if self.prompt != "\n" and self.prompt != self.start:
                raise ValueError(f"prompt={self.prompt!r} and start={self.start!r} are the same "
                                 f"setting (start is nanoGPT's name for it); give one")
            self.prompt = self.start


def sample(cfg):
    """Print and return cfg.num_samples continuations of the prompt (prompt included)."""
    runtime = init_runtime(cfg.device, cfg.dtype)
    try:
        model, record = load_model(cfg.ckpt, runtime.device)
        tokenizer = checkpoint_tokenizer(record, cfg.dataset, cfg.data_dir)
        prompt = cfg.prompt
        if prompt.startswith("FILE:"):
            path = Path(prompt[len("FILE:"):])
            if not path.is_file():
                raise ConfigError(f"prompt file {path} does not exist")
            prompt = path.read_text(encoding="utf-8")
        ids = tokenizer.encode(prompt)
        if not ids:
            raise ConfigError("the prompt is empty; give at least one character (the default "
                              "is a newline)")
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
    finally:
        teardown(runtime)


if __name__ == "__main__":
    main(SampleConfig, sample, __doc__)
