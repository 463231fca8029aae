"""
Token data prepared by data/<name>/prepare.py, the batch sampler, and the loss on the fixed
evaluation batches.

Layout of a prepared dataset directory (written by data/common.py):
    train.bin, val.bin   raw uint16 token ids, read through np.memmap
    meta.json            vocab_size, tokenizer, train_tokens, val_tokens, eot_token, ...

The sampler is a pure function of (seed, split, step, micro-batch index): no hidden RNG state,
so a resumed run draws exactly the batches the uninterrupted run would have drawn, and DDP ranks
draw different batches because each owns different global micro-batch indices.

Evaluation (`evaluate_loss`) uses a fixed set of batches, `EvalBatches`: the same at every call,
so the losses of different weights (the raw model and its averages, two checkpoints) on it are
paired comparisons. train.py, average.py and eval_ckpt.py all call it, so with the same
eval_iters, batch_size, block_size and seed they report the same numbers for the same weights.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from wagpt.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# Separate random streams, so the eval batches never coincide with training batches by seed.
_STREAMS = {"train": 0, "val": 1, "eval_train": 2}


class DataError(UserError, ValueError):
    """Missing, corrupt or incompatible data; the message says what to run or change."""


DTYPES = {"uint16": np.uint16, "uint32": np.uint32}   # meta.json "dtype" of the .bin files
FULL_SCAN_TOKENS = 1 << 28   # token ids of smaller splits are range-checked when opened


class TokenDataset:
    """The prepared dataset in `data_dir`, checked: meta.json an object with an integer
    vocab_size and a known dtype, each .bin a whole number of tokens of that dtype, of the length
    meta.json records, and (for splits up to FULL_SCAN_TOKENS; larger ones batch by batch) no
    token id past the vocabulary."""

    def __init__(self, data_dir, prepare_hint=None):
        self.dir = Path(data_dir)
        hint = prepare_hint or f"python -m data.{self.dir.name}.prepare"
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"no prepared dataset in {self.dir} (meta.json missing); run: {hint}")
        try:
            self.meta = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{meta_path} is not valid JSON ({e}); re-run: {hint}") from None
        if not isinstance(self.meta, dict):
            raise DataError(f"{meta_path} holds a JSON {type(self.meta).__name__}, not an object "
                            f"with vocab_size, dtype, ...; re-run: {hint}")
        vocab = self.meta.get("vocab_size")
        if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab <= 0:
            raise DataError(f"{meta_path}: vocab_size={vocab!r} must be a positive integer; "
                            f"re-run: {hint}")
        self.vocab_size = vocab
        dtype_name = self.meta.get("dtype", "uint16")   # files from before the key: uint16
        if dtype_name not in DTYPES:
            raise DataError(f"{meta_path}: dtype={dtype_name!r} is not supported; the .bin files "
                            f"must be one of {', '.join(DTYPES)}")
        self.dtype = np.dtype(DTYPES[dtype_name])
        if vocab > np.iinfo(self.dtype).max + 1:
            raise DataError(f"{meta_path}: vocab_size={vocab} does not fit dtype {dtype_name}")
        self.splits = {}
        for split in ("train", "val"):
            self.splits[split] = self._open_split(split, hint)

    def _open_split(self, split, hint):
        path = self.dir / f"{split}.bin"
        if not path.is_file():
            raise DataError(f"{path} is missing; run: {hint}")
        size = path.stat().st_size
        if size == 0 or size % self.dtype.itemsize:
            raise DataError(f"{path} has {size} bytes, not a whole, non-zero number of "
                            f"{self.dtype.name} tokens ({self.dtype.itemsize} bytes each): it is "
                            f"empty, truncated or of another dtype; re-run: {hint}")
        tokens = np.memmap(path, dtype=self.dtype, mode="r")
        expected = self.meta.get(f"{split}_tokens")
        if expected is not None and expected != len(tokens):
            raise DataError(f"{path} holds {len(tokens)} tokens but meta.json says {expected}: "
                            f"the file is truncated or stale; re-run: {hint}")
        if len(tokens) <= FULL_SCAN_TOKENS:
            check_token_ids(tokens, self.vocab_size, path)
        return tokens

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


def dataset_dir(dataset, data_dir=None):
    """The folder of a prepared dataset: `data_dir` if given, else data/<dataset>/."""
    return Path(data_dir) if data_dir else REPO / "data" / dataset


def open_dataset(dataset, data_dir=None):
    """The prepared dataset `data/<dataset>/` (or the folder `data_dir`), checked."""
    hint = None if data_dir else f"python -m data.{dataset}.prepare"
    return TokenDataset(dataset_dir(dataset, data_dir), prepare_hint=hint)


# ---------------------------------------------------------------------------------------------
# the data a checkpoint was trained on

DEFAULT_DATASET = "shakespeare_char"
GPT2_VOCAB_SIZE = 50257   # a model with this many tokens or more reads GPT-2 BPE


def data_record(dataset, data_dir, data):
    """What every checkpoint records of the data its model trained on (`data`, a TokenDataset,
    opened from `dataset` / `data_dir`): where it was, and its vocabulary, whole for character
    level, so that the tools take the data and the tokenizer from the checkpoint."""
    record = {"dataset": dataset, "data_dir": str(data_dir) if data_dir else None,
              "vocab_size": data.vocab_size, "tokenizer": data.meta.get("tokenizer")}
    if isinstance(data.meta.get("chars"), str):
        record["chars"] = data.meta["chars"]
    return record


def checkpoint_dataset(recorded, dataset=None, data_dir=None):
    """(dataset, data_dir, where from) for a tool that reads a checkpoint: the ones the user
    gave (`dataset` / `data_dir`, None when not given), else those the checkpoint records
    (`recorded`, a Checkpoint's `data`, may be None), else DEFAULT_DATASET."""
    if dataset is not None or data_dir is not None:
        return dataset or DEFAULT_DATASET, data_dir, "given"
    if recorded and (recorded.get("dataset") or recorded.get("data_dir")):
        return recorded.get("dataset") or DEFAULT_DATASET, recorded.get("data_dir"), "checkpoint"
    return DEFAULT_DATASET, None, "default"


def open_checkpoint_data(record, dataset=None, data_dir=None):
    """The TokenDataset to evaluate (or continue training) the checkpoint `record` on
    (checkpoint_dataset), checked against its vocabulary (check_vocabulary)."""
    dataset, data_dir, origin = checkpoint_dataset(record.data, dataset, data_dir)
    try:
        data = open_dataset(dataset, data_dir)
    except DataError as e:
        if origin == "given":
            raise
        where = "records" if origin == "checkpoint" else "records no dataset; the default is"
        raise DataError(f"{e} ({record.path} {where} {data_dir or dataset}: pass the data to "
                        f"use with --dataset=NAME or --data_dir=PATH)") from None
    check_vocabulary(data, record.model_args["vocab_size"], record.data, record.path)
    return data


def check_vocabulary(data, model_vocab_size, recorded, source):
    """DataError unless the model of `source` reads `data`'s tokens: the vocabulary the
    checkpoint records (`recorded`: tokenizer, vocab_size, chars), or, without a record, one of
    the model's kind (GPT-2 BPE for >= 50257 tokens, else character level) that fits in it."""
    meta = data.meta
    ours = {"tokenizer": meta.get("tokenizer"), "vocab_size": data.vocab_size,
            "chars": meta.get("chars")}
    if recorded and recorded.get("vocab_size") is not None:
        keys = [k for k in ("tokenizer", "vocab_size", "chars")
                if recorded.get(k) is not None and ours[k] is not None]
        differ = [k for k in keys if recorded[k] != ours[k]]
        what = ", ".join(f"{k} {_shown(ours[k])} vs {_shown(recorded[k])}" for k in differ)
    else:
        bpe_model = model_vocab_size >= GPT2_VOCAB_SIZE
        bpe_data = data.vocab_size >= GPT2_VOCAB_SIZE
        differ = bpe_model != bpe_data or data.vocab_size > model_vocab_size
        what = (f"vocab_size {data.vocab_size} vs the model's {model_vocab_size} "
                f"({'GPT-2 BPE' if bpe_model else 'character level'})")
    if differ:
        raise DataError(f"{data.dir} is not in the vocabulary of {source} ({what}); pass the "
                        f"data it was trained on: --dataset=NAME or --data_dir=PATH")


def _shown(value):
    return repr(value) if not isinstance(value, str) or len(value) <= 12 else \
        f"{len(value)} characters {value[:12]!r}..."


def micro_batch_seed(seed, split, step, index):
    """The seed of one micro-batch: a pure function of where it sits in training."""
    return [seed, _STREAMS[split], step, index]


def check_token_ids(tokens, vocab_size, source):
    """DataError if a token id is >= vocab_size (a corrupt file, or meta.json of other data)."""
    top = int(tokens.max()) if len(tokens) else 0
    if top >= vocab_size:
        raise DataError(f"{source} holds token id {top}, outside its vocabulary of {vocab_size} "
                        f"(meta.json's vocab_size): the file is corrupt or belongs to another "
                        f"dataset; re-run its prepare.py")


def get_batch(tokens, block_size, batch_size, seed, vocab_size=None):
    """`batch_size` random windows of `block_size + 1` tokens: inputs x and next-token targets y.
    With vocab_size, a token id past it is a DataError (for splits too large to check whole)."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
    windows = tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)
    if vocab_size is not None and len(tokens) > FULL_SCAN_TOKENS:
        check_token_ids(windows, vocab_size, getattr(tokens, "filename", "the data"))
    windows = torch.from_numpy(windows)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def to_device(x, y, device):
    if device.type == "cuda":
        # pinned + non_blocking lets the copy overlap the previous step's GPU work
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


# ---------------------------------------------------------------------------------------------
# evaluation on a fixed set of batches

@dataclass(frozen=True)
class EvalBatches:
    """A fixed set of evaluation batches per split: batch i of split s is drawn from
    (seed, stream of s, i), the same at every evaluation."""
    eval_iters: int      # batches per split
    batch_size: int
    block_size: int
    seed: int


@torch.no_grad()
def evaluate_loss(model, data, batches, runtime, splits=("train", "val"), progress=None):
    """{split: mean loss over batches.eval_iters batches}. Under DDP the batches are split over
    the ranks and the sum is all-reduced, so every rank gets the same numbers. The model is put
    in eval mode for the call and back in train mode after it. `progress` (a report.Progress)
    is told of every batch."""
    model.eval()
    losses = {}
    for split in splits:
        stream = "eval_train" if split == "train" else split
        total = torch.zeros((), dtype=torch.float64, device=runtime.device)
        for i in range(runtime.rank, batches.eval_iters, runtime.world_size):
            x, y = get_batch(data.splits[split], batches.block_size, batches.batch_size,
                             micro_batch_seed(batches.seed, stream, 0, i), data.vocab_size)
            with runtime.autocast():
                _, loss = model(*to_device(x, y, runtime.device))
            total += loss.double()
            if progress is not None:
                progress.update()
        if runtime.ddp:
            dist.all_reduce(total)
        losses[split] = total.item() / batches.eval_iters
    model.train()
    return losses
