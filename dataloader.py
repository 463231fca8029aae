"""
Token data prepared by data/<name>/prepare.py, and the batch sampler.

Layout of a prepared dataset directory (written by data/common.py):
    train.bin, val.bin   raw uint16 token ids, read through np.memmap
    meta.json            vocab_size, tokenizer, train_tokens, val_tokens, eot_token, ...

The sampler is a pure function of (seed, split, step, micro-batch index): no hidden RNG state,
so a resumed run draws exactly the batches the uninterrupted run would have drawn, and DDP ranks
draw different batches because each owns different global micro-batch indices.
"""

import json
from pathlib import Path

import numpy as np
import torch

# Separate random streams, so the eval batches never coincide with training batches by seed.
_STREAMS = {"train": 0, "val": 1, "eval_train": 2}


class DataError(ValueError):
    """Missing, corrupt or incompatible data; the message says what to run or change."""


class TokenDataset:
    def __init__(self, data_dir, prepare_hint=None):
        self.dir = Path(data_dir)
        hint = prepare_hint or f"python data/{self.dir.name}/prepare.py"
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"no prepared dataset in {self.dir} (meta.json missing); run: {hint}")
        try:
            self.meta = json.loads(meta_path.read_text())
            self.vocab_size = int(self.meta["vocab_size"])
        except (ValueError, KeyError) as e:
            raise DataError(f"{meta_path} is unreadable ({e}); re-run: {hint}") from e
        self.splits = {}
        for split in ("train", "val"):
            path = self.dir / f"{split}.bin"
            if not path.is_file():
                raise DataError(f"{path} is missing; run: {hint}")
            self.splits[split] = np.memmap(path, dtype=np.uint16, mode="r")
            expected = self.meta.get(f"{split}_tokens")
            if expected is not None and expected != len(self.splits[split]):
                raise DataError(f"{path} holds {len(self.splits[split])} tokens but meta.json "
                                f"says {expected}: the file is truncated or stale; re-run: {hint}")

    def check_fits(self, block_size, model_vocab_size):
        """Fail before training if the model cannot represent the data or the data is too short."""
        if model_vocab_size < self.vocab_size:
            raise DataError(f"vocab_size={model_vocab_size} is smaller than the dataset's "
                            f"{self.vocab_size} tokens ({self.dir}); set --vocab_size>="
                            f"{self.vocab_size} or leave it None to take it from meta.json")
        for split, tokens in self.splits.items():
            if len(tokens) <= block_size + 1:
                raise DataError(f"{split} split of {self.dir} has {len(tokens)} tokens, too few "
                                f"for block_size={block_size}; lower --block_size")


def micro_batch_seed(seed, split, step, index):
    """The seed of one micro-batch: a pure function of where it sits in training."""
    return [seed, _STREAMS[split], step, index]


def get_batch(tokens, block_size, batch_size, seed):
    """`batch_size` random windows of `block_size + 1` tokens: inputs x and next-token targets y."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
    windows = tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)
    windows = torch.from_numpy(windows)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def to_device(x, y, device):
    if device.type == "cuda":
        # pinned + non_blocking lets the copy overlap the previous step's GPU work
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)
