"""
A training trajectory on disk: the checkpoint files of one run, found, ordered by step and read
one at a time, for the offline averaging tool.

Two kinds of files are accepted, side by side in one directory or not:
- this project's snapshots, `step_<s>.safetensors` (and the averaged ones of save_averaged), and
  its resume checkpoints `ckpt_<s>.pt`;
- nanoGPT-style checkpoints (what nanoGPT, the LAWA code and the Coupled Adam code write): a
  torch.save'd dict with `model` (keys possibly prefixed `_orig_mod.`, maybe with the causal-mask
  buffers `*.attn.bias` of non-flash attention, which are dropped), `model_args` and `iter_num`.
The step is the file's own record (snapshot metadata `step`, or `iter_num`), else the last number
in the file name (`ckpt_52500.pt`). Finding the steps reads only headers: the safetensors JSON
header, or the pickle of a .pt loaded with mmap (tensor bytes stay on disk).

Nothing is ever written here, and nothing is unpickled that could run code (weights_only=True).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as safetensors_load_file

from checkpoint import CheckpointError
from model import GPTConfig

SUFFIXES = (".safetensors", ".pt", ".pth")
_MASK_BUFFER = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")   # nanoGPT's non-flash causal mask


@dataclass
class CheckpointFile:
    path: Path
    step: int


@dataclass
class Weights:
    state: dict          # parameter name -> tensor (prefixes and mask buffers removed)
    model_args: dict     # GPTConfig fields
    tokens_seen: int | None


def discover(directory):
    """(files in step order, other files ignored). Raises CheckpointError for a missing or empty
    directory, a checkpoint-named file whose header cannot be read, or two files of one step."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    files, ignored, bad = [], [], []
    for path in sorted(directory.iterdir()):
        if path.is_dir() or path.name.startswith("."):   # .tmp files of a write in progress
            continue
        if path.suffix not in SUFFIXES:
            ignored.append(path)
            continue
        try:
            files.append(CheckpointFile(path, read_step(path)))
        except CheckpointError as e:
            bad.append((path, str(e)))
    if not files and not bad:
        raise CheckpointError(f"{directory} holds no checkpoints (*.safetensors, *.pt, *.pth)")
    files.sort(key=lambda f: f.step)
    for a, b in zip(files, files[1:]):
        if a.step == b.step:
            raise CheckpointError(f"{a.path.name} and {b.path.name} are both step {a.step}; "
                                  f"move one out of {directory}")
    return files, ignored, bad


def read_step(path):
    path = Path(path)
    if path.suffix == ".safetensors":
        metadata = _safetensors_header(path).get("__metadata__") or {}
        if "step" in metadata:
            return _int_step(metadata["step"], path)
    else:
        ckpt = _torch_load(path, mmap=True)
        if "iter_num" in ckpt:
            return _int_step(ckpt["iter_num"], path)
    numbers = re.findall(r"\d+", path.stem)
    if not numbers:
        raise CheckpointError(f"{path}: no step recorded in the file (metadata 'step' or "
                              f"'iter_num') and no number in its name")
    return int(numbers[-1])


def read(path):
    """The weights of one checkpoint file, read once (mmap: only the model's bytes are paged in
    for a .pt that also holds optimizer state)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            state = safetensors_load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or "
                                  f"corrupt?): {e}") from e
        metadata = _safetensors_header(path).get("__metadata__") or {}
        if "model_args" not in metadata:
            raise CheckpointError(f"{path} has no model_args metadata: not a snapshot of this "
                                  f"project (checkpoint.save_snapshot writes them)")
        model_args = json.loads(metadata["model_args"])
        tokens = metadata.get("tokens_seen")
        tokens = int(tokens) if tokens is not None else None
    else:
        ckpt = _torch_load(path, mmap=True)
        if not isinstance(ckpt.get("model"), dict) or "model_args" not in ckpt:
            raise CheckpointError(f"{path} is not a model checkpoint: it needs 'model' and "
                                  f"'model_args' entries (has {sorted(ckpt)[:6]})")
        state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
        state = {k: v for k, v in state.items() if not _MASK_BUFFER.search(k)}
        model_args, tokens = ckpt["model_args"], ckpt.get("tokens_seen")
    return Weights(state, _check_model_args(model_args, path), tokens)


def _check_model_args(model_args, path):
    known = set(GPTConfig.__dataclass_fields__)
    extra = {k: v for k, v in model_args.items() if k not in known}
    changes_the_model = {k: v for k, v in extra.items() if v not in (None, False, 0)}
    if changes_the_model:
        raise CheckpointError(f"{path}: model_args {changes_the_model} describe an architecture "
                              f"model.py does not have; its loss here would be wrong")
    return {k: v for k, v in model_args.items() if k in known}


def _torch_load(path, mmap):
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            # a legacy (pre-zip) torch.save file: readable, only not mappable
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a loadable checkpoint (truncated, corrupt, not "
                              f"saved by torch.save, or holding objects that are unsafe to "
                              f"unpickle): {e}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def _safetensors_header(path):
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100_000_000:
                raise ValueError(f"header length {size}")
            return json.loads(f.read(size))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or "
                              f"corrupt?): {e}") from e


def _int_step(value, path):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: its step {value!r} is not an integer") from None
