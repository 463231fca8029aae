"""Shared fixtures: a tiny prepared char-level dataset and a tiny training config."""

import json
import os
import random

import numpy as np
import pytest
import torch

from wagpt.trainer import TrainConfig

# Triton chooses between its GPU compiler and its interpreter when @triton.jit DECORATES a kernel
# (triton.jit reads triton.knobs.runtime.interpret, i.e. TRITON_INTERPRET, right then; a launch
# never looks again), and wagpt/kernels/ decorates its kernels when the first triton_ops() imports
# wagpt/kernels/averaging_triton.py. So the variable must be set before that import, though not
# before `import triton` (the import of train above has done that: train → averaging → kernels).
# Pytest imports conftest.py before any test module, so this holds for one test file and for the
# suite; it stays set for the session (the interpreter also runs CUDA tensors, by copying them,
# so nothing breaks elsewhere, it is only slower). The Triton tests run the kernels in it.
os.environ["TRITON_INTERPRET"] = "1"


def write_char_dataset(directory, text, val_fraction=0.1):
    """A prepared dataset in the layout of data/<name>/ (train.bin, val.bin, meta.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = "".join(sorted(set(text)))
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    cut = int(len(ids) * (1 - val_fraction))
    ids[:cut].tofile(directory / "train.bin")
    ids[cut:].tofile(directory / "val.bin")
    meta = {"vocab_size": len(chars), "tokenizer": "char", "chars": chars, "dtype": "uint16",
            "train_tokens": cut, "val_tokens": len(ids) - cut, "eot_token": None,
            "source": "test fixture"}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "the", "king", "queen", "love", "night", "day", "sweet"]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
                     for _ in range(3000))
    return write_char_dataset(tmp_path_factory.mktemp("tinydata"), text)


@pytest.fixture
def make_config(tiny_data_dir, tmp_path):
    """TrainConfig for a 2-layer, 32-wide model that trains in well under a second per step."""
    def make(**overrides):
        base = dict(data_dir=str(tiny_data_dir), out_dir=str(tmp_path / "out"), n_layer=2,
                    n_head=2, n_embd=32, block_size=16, batch_size=4, max_iters=8,
                    eval_interval=4, eval_iters=2, log_interval=2, ckpt_interval=4,
                    warmup_iters=2, learning_rate=1e-2, min_lr=1e-3, dropout=0.0, device="cpu",
                    lawa_interval=2)
        base.update(overrides)
        return TrainConfig(**base)
    return make


@pytest.fixture(autouse=True)
def _reset_torch_state():
    """Tests must not leak seeds or default dtype into each other."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: with 2+ threads on a busy machine every op waits for the other thread
    (~15 ms), far longer than its math; one thread runs them 10-100x faster. A module that
    wants it says `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
