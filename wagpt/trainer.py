"""
The building blocks of training that train.py's loop, bench.py, the benchmarks and the tests
share: the config, the model, optimizer and averages built from it, one optimizer step, the
evaluation of the raw and averaged weights, and the Checkpointer that saves and restores all of
it.

    cfg, start = load_start(cfg)                # the checkpoint to start from (None: scratch)
    run = build(cfg, runtime, data)             # model, optimizer, averages, post-hoc profiles
    checkpointer = Checkpointer(run, cfg, runtime)
    checkpointer.load(start)                    # resume or branch: one load
    loss = train_step(model, run.optimizer, batches, cfg, runtime, lr)
    checkpointer.save()                         # one save: every component's state_dict

What makes a resumed run bitwise-identical to an uninterrupted one: the batch of every micro-step
and the dropout RNG are pure functions of (seed, step, ...), the LR is a pure function of the
step, and the checkpoint holds model + optimizer + averages + post-hoc profiles + step. Nothing
else carries state.
"""

import dataclasses
import math
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, NAMED_SIZES, GPTConfig
from wagpt import checkpoint, integrity, schedules
from wagpt.configurator import check_finite_numbers, replace_config, was_given
from wagpt.dataloader import (EvalBatches, checkpoint_dataset, data_record, evaluate_loss,
                              get_batch, micro_batch_seed, open_checkpoint_data, open_dataset,
                              to_device)
from wagpt.errors import CheckpointError, ConfigError, Problems, UserError, WriteError
from wagpt.flat_params import FlatParameters
from wagpt.online_averaging import (AveragingConfig, OnlineAveraging, averager_hparams,
                                    posthoc_profiles)
from wagpt.run_dir import (OutDirError, OutDirLock, latest_resume_or_error, new_run_id,
                           refuse_to_overwrite, remove_leftover_temporaries, set_aside)
from wagpt.runtime import LostContact, all_reduce_mean, check_device, check_dtype, lost_contact


@dataclass
class TrainConfig(AveragingConfig):
    # I/O
    out_dir: str = "out/shakespeare_char"  # checkpoints, snapshots, config.json, metrics.jsonl
    eval_interval: int = 250       # evaluate train/val loss every this many steps (and at the end)
    eval_iters: int = 100          # batches per split per evaluation (a fixed set: same every time)
    log_interval: int = 10         # print/log the training loss every this many steps
    ckpt_interval: int = 250       # a resume checkpoint every this many steps (and at the end)
    keep_last: int = 2             # resume checkpoints to keep (0 = all); snapshots: never pruned
    snapshot_interval: int = 0     # model-only snapshot to out_dir/snapshots every N steps (0: off)
    init_from: str = "scratch"     # 'scratch' | 'resume' (latest in out_dir) | a .pt/.safetensors |
                                   # 'gpt2' ... 'gpt2-xl' | a transformers GPT-2 folder
    stop_iter: int | None = None   # end this invocation after this step, with a resume checkpoint;
                                   # the schedule still runs to max_iters (for time-limited jobs)
    eval_only: bool = False        # evaluate the start point (init_from: its raw weights and the
                                   # averages it holds) on the eval batches and exit; writes nothing
    # logging
    wandb_log: bool = False        # also log to Weights & Biases (WANDB_MODE=offline is honoured)
    wandb_project: str = "weight-averaging"  # W&B project
    wandb_run_name: str | None = None  # W&B run name (None: W&B picks one)
    # data
    dataset: str = "shakespeare_char"  # a prepared folder under data/
    data_dir: str | None = None    # explicit path to a prepared dataset (overrides `dataset`)
    batch_size: int = 12           # sequences per micro-batch per process
    block_size: int = 64           # context length
    gradient_accumulation_steps: int = 1  # micro-batches per step, summed over all DDP ranks
    # model
    # Architecture keys are taken from the checkpoint when resuming or branching.
    model_size: str | None = None  # 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl': sets
                                   # n_layer/n_head/n_embd
    n_layer: int = 4               # transformer blocks
    n_head: int = 4                # attention heads per block
    n_embd: int = 128              # width of the residual stream
    dropout: float = 0.0           # dropout probability in training (0 for pretraining)
    bias: bool = False             # biases in Linear and LayerNorm layers (GPT-2 has them)
    vocab_size: int | None = None  # None: the dataset's vocab size (set 50304 for GPT-2 BPE speed)
    # optimizer
    optimizer: str = "adamw"       # 'adamw' | 'coupled_adam' (AdamW, Coupled Adam on the embedding)
    learning_rate: float = 1e-3    # peak LR
    weight_decay: float = 0.1      # applied to >=2-D tensors only
    beta1: float = 0.9             # Adam's first-moment decay
    beta2: float = 0.99            # Adam's second-moment decay
    grad_clip: float = 1.0         # clip the global gradient norm to this (0 = off)
    coupled_adam_scale: float = 1.0  # coupled_adam: c times the vocabulary-mean second moment of
                                   # the embedding (1 = the paper; its scaled runs use powers of 2)
    embedding_weight_decay: float | None = None  # decoupled weight decay of the token embedding
                                   # (= the tied LM head). None: adamw decays it with weight_decay
                                   # like every matrix, coupled_adam does not (0, the paper). The
                                   # paper compares the two with 0 in both (config/train_small_
                                   # coupled_adam.py and train_small_adamw_baseline.py)
    # learning-rate schedule
    # lr = learning_rate * multiplier(step), schedules.py
    lr_schedule: str = "cosine"    # 'constant' | 'cosine' | 'wsd' (warmup-stable-decay)
    max_iters: int = 2000          # total optimizer steps
    warmup_iters: int = 100        # linear warmup steps, (step + 1) / (warmup_iters + 1)
    lr_decay_iters: int | None = None  # cosine: reaches min_lr here (None = max_iters)
    min_lr: float = 1e-4           # cosine floor
    cooldown_frac: float = 0.2     # wsd: cooldown over the last 20% of max_iters ...
    cooldown_start: int | None = None  # ... or from this step
    cooldown_shape: str = "1-sqrt"  # wsd: 'linear' | 'cosine' | '1-sqrt' | 'square'
    final_lr_frac: float = 0.0     # wsd: LR at the end of the cooldown, as a fraction of the peak
    # weight averaging during training
    # At each eval the raw and every averaged model are evaluated on the same val batches
    # (val_loss/raw, val_loss/ema, ...). Each method's own keys are listed under its name below;
    # the math is in docs/averaging.md.
    averaging: str = "ema,bema,lawa"  # comma-separated methods, 'all', or '' for none
    save_averaged: bool = False    # also write out_dir/averaged/<method>/step_N.safetensors at
                                   # every snapshot and at the end
    ema_decay: float = 0.995       # the default run's: EMA half-life ~140 steps
    lawa_k: int = 5                # the default run's: the 5 latest checkpoints ...
    lawa_interval: int = 100       # ... spaced 100 steps apart
    # post-hoc EMA profiles
    # Power-function EMAs (EDM2's phema) of these widths, kept apart from --averaging and written
    # with every snapshot to out_dir/posthoc/step_N.safetensors (each one the size of a
    # snapshot); average.py --methods=phema reconstructs the phema of any other width from them
    # (docs/averaging.md). Off when snapshot_interval is 0.
    posthoc_sigma_rel: tuple[float, ...] | None = (0.05, 0.10)  # σ_rel of each stored profile
                                   # (EDM2's pair); None or () = none
    posthoc_update_after: int = 0  # τ: the profiles start at this step (a run branched off a
                                   # snapshot at step s needs s or later)
    posthoc_update_freq: int = 1   # φ: the profiles act every φ steps
    # system
    device: str = "auto"           # 'auto' (cuda if available) | 'cpu' | 'cuda' | 'cuda:1' ...
    dtype: str = "auto"            # 'auto' (bfloat16 autocast on CUDA, float32 on CPU) |
                                   # 'float32' | 'bfloat16'
    compile: bool = False          # torch.compile the model
    seed: int = 1337               # initial weights, batches and dropout are functions of it
    peak_flops: float | None = None  # device peak FLOP/s for MFU (None: looked up for
                                     # A100/H100/H200)
    dist_timeout: float = 600      # under torchrun: seconds a rank waits for the others before the
                                   # run stops with an error (a node died or froze); more than
                                   # rank 0 takes to write a checkpoint

    def __post_init__(self):
        problems = Problems()   # every problem of the config, reported together
        positive = ["eval_interval", "eval_iters", "log_interval", "ckpt_interval", "batch_size",
                    "block_size", "gradient_accumulation_steps", "n_layer", "n_head", "n_embd",
                    "max_iters"]
        for key in positive:
            if getattr(self, key) <= 0:
                problems.add(f"{key}={getattr(self, key)} must be > 0")
        for key in ("keep_last", "snapshot_interval", "warmup_iters", "grad_clip",
                    "weight_decay", "seed", "min_lr"):
            if getattr(self, key) < 0:
                problems.add(f"{key}={getattr(self, key)} must be >= 0")
        if self.embedding_weight_decay is not None and not self.embedding_weight_decay >= 0:
            problems.add(f"embedding_weight_decay={self.embedding_weight_decay} must be >= 0, "
                         f"or None for each optimizer's default (adamw: weight_decay, "
                         f"coupled_adam: 0)")
        with problems.check():
            check_finite_numbers(self)
        if not self.out_dir.strip():
            problems.add("out_dir is empty; give the run a folder, e.g. --out_dir=out/run")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                problems.add(f"{key}={getattr(self, key)} must be in [0, 1)")
        if not 0 <= self.dropout < 1:
            problems.add(f"dropout={self.dropout} must be in [0, 1)")
        if not self.dist_timeout > 0:
            problems.add(f"dist_timeout={self.dist_timeout} must be > 0 (seconds)")
        if self.peak_flops is not None and not self.peak_flops > 0:
            problems.add(f"peak_flops={self.peak_flops} must be > 0 (FLOP/s), or None")
        with problems.check():
            check_device(self.device)
        if self.model_size is not None and self.model_size not in NAMED_SIZES:
            problems.add(f"model_size={self.model_size!r} is unknown; use one of "
                         f"{sorted(NAMED_SIZES)} or None")
        elif self.model_size is not None:
            self._resolve_model_size(problems)
        if self.n_head > 0 and self.n_embd % self.n_head:
            problems.add(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}: each "
                         f"head gets n_embd / n_head channels; e.g. --n_head="
                         f"{_divisor_near(self.n_embd, self.n_head)}")
        if self.optimizer not in ("adamw", "coupled_adam"):
            problems.add(f"optimizer={self.optimizer!r} is unknown; use 'adamw' or "
                         f"'coupled_adam'")
        if not self.coupled_adam_scale > 0:
            problems.add(f"coupled_adam_scale={self.coupled_adam_scale} must be > 0 "
                         f"(1 = the paper's Coupled Adam)")
        with problems.check():
            check_dtype(self.dtype)
        if self.stop_iter is not None and not 0 < self.stop_iter <= self.max_iters:
            problems.add(f"stop_iter={self.stop_iter} must be in (0, max_iters={self.max_iters}]")
        if self.snapshot_interval == 0 and self.posthoc_sigma_rel and \
                was_given(self, "posthoc_sigma_rel"):
            problems.add(f"posthoc_sigma_rel={self.posthoc_sigma_rel} with snapshot_interval=0: "
                         f"the post-hoc profiles are written with the snapshots, so none would "
                         f"be kept; set --snapshot_interval=N, or drop --posthoc_sigma_rel")
        with problems.check():
            schedules.from_config(self)  # an impossible schedule, naming the key
        with problems.check():
            averager_hparams(self)       # an unknown method or impossible hyperparameter
        with problems.check():
            posthoc_profiles(self)       # an impossible width, burn-in or period
        problems.raise_if_any()

    def _resolve_model_size(self, problems):
        """model_size sets n_layer/n_head/n_embd: one given too with another value is a
        conflict, and the named size's values become the fields, so config.json records the
        model that trains."""
        shape = NAMED_SIZES[self.model_size]
        clash = [f"{key}={getattr(self, key)}" for key in shape
                 if was_given(self, key) and getattr(self, key) != shape[key]]
        if clash:
            problems.add(f"model_size={self.model_size!r} (n_layer={shape['n_layer']}, "
                         f"n_head={shape['n_head']}, n_embd={shape['n_embd']}) and "
                         f"{', '.join(clash)} both set the model's shape; give one: "
                         f"--model_size=None to use {' '.join('--' + c for c in clash)}, or "
                         f"drop {', '.join('--' + c.split('=')[0] for c in clash)}")
        for key, value in shape.items():
            setattr(self, key, value)


def _divisor_near(n, k):
    """The divisor of n closest to k (a head count that fits n channels)."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


# ---------------------------------------------------------------------------------------------
# data

def micro_steps_per_rank(cfg, runtime):
    if cfg.gradient_accumulation_steps % runtime.world_size:
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must "
                          f"be a multiple of the number of processes ({runtime.world_size})")
    return cfg.gradient_accumulation_steps // runtime.world_size


def train_batches(data, cfg, runtime, start_step):
    """This rank's micro-batches from `start_step` on, in order.

    The global micro-batch index of (rank, micro) is rank * per_rank + micro, so 2 ranks with 1
    micro-step each see the same batches as 1 process with 2 micro-steps.
    """
    per_rank = micro_steps_per_rank(cfg, runtime)
    step = start_step
    while True:
        for micro in range(per_rank):
            seed = micro_batch_seed(cfg.seed, "train", step, runtime.rank * per_rank + micro)
            x, y = get_batch(data.splits["train"], cfg.block_size, cfg.batch_size, seed,
                             data.vocab_size)
            yield to_device(x, y, runtime.device)
        step += 1


def eval_batches(cfg):
    """The fixed evaluation batches of this run (dataloader.EvalBatches)."""
    return EvalBatches(cfg.eval_iters, cfg.batch_size, cfg.block_size, cfg.seed)


# ---------------------------------------------------------------------------------------------
# where to start, and what trains

ARCHITECTURE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


def load_start(cfg):
    """(cfg, the Checkpoint to start from or None). Resuming or branching keeps the file's
    architecture: a key the user gave (model_size, n_layer, n_head, n_embd, block_size,
    vocab_size, bias) must equal the file's, else a ConfigError naming it (every such key at
    once); the keys not given are set to the file's values in the returned cfg, so config.json,
    the batches and the token count describe the model that trains. A branch (not a resume) may
    give a shorter block_size: the model's context is cropped to it, as nanoGPT crops GPT-2's.
    The data is the file's unless dataset or data_dir is given (open_run_data checks it)."""
    if cfg.init_from == "resume":
        start = checkpoint.read_checkpoint(latest_resume_or_error(cfg.out_dir))
    elif cfg.init_from != "scratch":   # a checkpoint or snapshot (e.g. a cooldown's branch),
        start = checkpoint.read_checkpoint(cfg.init_from)   # gpt2 ... gpt2-xl, a HF folder
    else:
        return cfg, None
    saved, given = start.model_args, {}
    if cfg.model_size is not None and was_given(cfg, "model_size"):
        given = {key: (value, "model_size") for key, value in NAMED_SIZES[cfg.model_size].items()}
    for key in ARCHITECTURE_KEYS:
        if was_given(cfg, key) and getattr(cfg, key) is not None:
            given[key] = (getattr(cfg, key), key)
    problems, crop = Problems(), None
    for key, (value, setting) in given.items():
        if key not in saved or saved[key] == value:
            continue
        if key == "block_size" and value < saved[key] and cfg.init_from != "resume":
            crop = value
            continue
        shown = f"{setting}={getattr(cfg, setting)!r}"
        longer = (" (a branch may shorten the context, not lengthen it)"
                  if key == "block_size" and cfg.init_from != "resume" else "")
        problems.add(f"{shown} but {start.path} holds a model with {key}={saved[key]!r}; "
                     f"resuming or branching keeps the saved architecture{longer}: drop "
                     f"--{setting}, or start a new run from scratch")
    problems.raise_if_any()
    if crop is not None:
        start = crop_context(start, crop)
    adopted = {key: start.model_args[key] for key in ARCHITECTURE_KEYS if key in start.model_args}
    if cfg.init_from == "resume":
        adopted.update(resumed_data_order(cfg, start))
    dataset, data_dir, _ = checkpoint_dataset(
        start.data, *(getattr(cfg, k) if was_given(cfg, k) else None
                      for k in ("dataset", "data_dir")))
    return replace_config(cfg, model_size=None, dataset=dataset, data_dir=data_dir,
                          **adopted), start


def crop_context(start, block_size):
    """The Checkpoint `start` with its context cropped to `block_size` positions: the first
    rows of the position embedding (and of their AdamW moments, Checkpointer.load); its averages
    cover the longer model and do not continue."""
    weights = dict(start.weights)
    weights["transformer.wpe.weight"] = weights["transformer.wpe.weight"][:block_size]
    return dataclasses.replace(start, weights=weights, averaging=None, posthoc=None,
                               model_args={**start.model_args, "block_size": block_size})


def open_run_data(cfg, start):
    """The run's data (the cfg load_start returned): a run from a checkpoint must read the
    checkpoint's vocabulary (dataloader.open_checkpoint_data)."""
    if start is None:
        return open_dataset(cfg.dataset, cfg.data_dir)
    return open_checkpoint_data(start, *(getattr(cfg, k) if was_given(cfg, k) else None
                                         for k in ("dataset", "data_dir")))


DATA_ORDER_KEYS = ("seed",)   # the batches, the eval batches and dropout are functions of it


def resumed_data_order(cfg, start):
    """{key: the checkpoint's value} of DATA_ORDER_KEYS for a resume: one the user gave must
    equal the checkpoint's (a resume continues the same batches), else a ConfigError naming it.
    Checkpoints that do not record it (older, nanoGPT's) keep the given value."""
    saved = start.config or {}
    found = {}
    for key in DATA_ORDER_KEYS:
        if key not in saved:
            continue
        if was_given(cfg, key) and getattr(cfg, key) != saved[key]:
            raise ConfigError(f"{key}={getattr(cfg, key)!r} but {start.path} was trained with "
                              f"{key}={saved[key]!r}; a resume continues the same data order: "
                              f"drop --{key}, or branch a new run off the checkpoint with "
                              f"--init_from={start.path} --out_dir=...")
        found[key] = saved[key]
    return found


def model_args_from_config(cfg, data):
    shape = dict(NAMED_SIZES[cfg.model_size]) if cfg.model_size else \
        dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    return dict(block_size=cfg.block_size, vocab_size=cfg.vocab_size or data.vocab_size,
                dropout=cfg.dropout, bias=cfg.bias, **shape)


@dataclass
class TrainState:
    iter_num: int = 0       # optimizer steps completed
    tokens_seen: int = 0

    def state_dict(self):
        return {"iter_num": self.iter_num, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, saved):
        self.iter_num, self.tokens_seen = saved["iter_num"], saved["tokens_seen"]


@dataclass
class Training:
    """Everything a training run updates: built by build(), saved and restored as one by a
    Checkpointer."""
    model: GPT                  # the bare model (what checkpoints hold); its weights are views
    flat: FlatParameters        # ... into this one buffer
    optimizer: torch.optim.Optimizer
    online: OnlineAveraging     # the averages of cfg.averaging
    posthoc: OnlineAveraging    # the post-hoc EMA profiles (phema averagers named 'sigma_rel=...')
    state: TrainState
    model_args: dict
    data: dict | None = None    # what checkpoints record of the data (dataloader.data_record)


def build(cfg, runtime, data):
    """The model (seeded by cfg.seed, all weights in one flat buffer), its optimizer, the averages
    of cfg.averaging and the post-hoc profiles, at step 0; a Checkpointer loads saved state into
    them. Give it the cfg load_start returned: the architecture is the start file's."""
    model_args = model_args_from_config(cfg, data)
    data.check_fits(model_args["block_size"], model_args["vocab_size"])
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    model = GPT(GPTConfig(**model_args)).to(runtime.device)
    # on its device, before the optimizer, compile and DDP see it: all weights in one buffer
    flat = FlatParameters(model)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                           (cfg.beta1, cfg.beta2), runtime.device.type,
                                           cfg.optimizer, cfg.coupled_adam_scale,
                                           cfg.embedding_weight_decay)
    online = OnlineAveraging(flat, averager_hparams(cfg), runtime.rank, runtime.world_size)
    posthoc = OnlineAveraging(flat, posthoc_profiles(cfg), runtime.rank, runtime.world_size,
                              method="phema")
    return Training(model, flat, optimizer, online, posthoc, TrainState(), model_args,
                    data_record(cfg.dataset, cfg.data_dir, data))


def start_averaging(run, cfg):
    """At the run's first step: initialise every average and post-hoc profile that has no saved
    state and whose burn-in is this step; refuse those whose burn-in has passed, naming every
    key at once."""
    step = run.state.iter_num
    fresh = [name for name, a in run.posthoc.averagers.items() if a.step is None]
    problems = Problems()
    with problems.check():
        run.online.start(step)
    if fresh and cfg.posthoc_update_after < step:
        problems.add(
            f"posthoc_update_after={cfg.posthoc_update_after}, but this run starts at step "
            f"{step} with no saved post-hoc profile {fresh[0]} to continue; set "
            f"--posthoc_update_after={step} (or later) to start the profiles here, or "
            f"turn them off with --posthoc_sigma_rel=None")
    problems.raise_if_any()
    run.posthoc.start(step)
    run.flat.check()


def wrap_model(model, cfg, runtime):
    """torch.compile and/or DDP around the bare model (checkpoints always save the bare one)."""
    if cfg.compile:
        model = torch.compile(model)
    if runtime.ddp:
        model = DDP(model,
                    device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None)
    return model


# ---------------------------------------------------------------------------------------------
# one step, evaluation

def seed_step(cfg, runtime, step):
    """Dropout RNG as a pure function of (seed, step, rank): exact resume needs no RNG state."""
    torch.manual_seed(int(np.random.SeedSequence([cfg.seed, 7, step, runtime.rank])
                          .generate_state(1)[0]))


def train_step(model, optimizer, batches, cfg, runtime, lr):
    """One optimizer step over this rank's micro-batches; returns the mean loss (on device)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    n_micro = micro_steps_per_rank(cfg, runtime)
    total = torch.zeros((), device=runtime.device)
    for micro in range(n_micro):
        x, y = next(batches)
        # gradients are all-reduced only on the last micro-step
        sync = model.no_sync() if runtime.ddp and micro < n_micro - 1 else nullcontext()
        with sync:
            with runtime.autocast():
                _, loss = model(x, y)
            loss = loss / n_micro
            loss.backward()
        total += loss.detach()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def evaluate(model, online, data, batches, runtime):
    """{'train', 'val': the raw weights' losses, 'averaged': {method: val loss}} on the same
    fixed batches, for every average that has started. `model` is the one that runs forward
    passes (under DDP its .module: no collectives inside)."""
    losses = evaluate_loss(model, data, batches, runtime)
    averaged = {}
    for name in online.ready():
        with online.swapped_in(name):   # a collective under DDP
            averaged[name] = evaluate_loss(model, data, batches, runtime, splits=("val",))["val"]
    return {**losses, "averaged": averaged}


def eval_record(step, tokens, losses):
    """The metrics.jsonl record of an evaluation."""
    return {"iter": step, "tokens": tokens, "train_loss": losses["train"],
            "val_loss": losses["val"], "val_loss/raw": losses["val"],
            **{f"val_loss/{name}": loss for name, loss in losses["averaged"].items()}}


def format_eval(step, losses):
    """`step N: train loss a, val loss b` and, with averages, the line of every val loss."""
    text = f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
    if losses["averaged"]:
        text += "\n    val loss  " + " | ".join(
            f"{name} {loss:.4f}" for name, loss in [("raw", losses["val"]),
                                                   *losses["averaged"].items()])
    return text


# ---------------------------------------------------------------------------------------------
# saving and restoring

class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the state became NaN or infinite; nothing non-finite is saved."""


class Checkpointer:
    """Saves and restores a Training as one: the model, the optimizer, the averages, the
    post-hoc profiles and the train state, each through its state_dict, as the resume
    checkpoint's entries (checkpoint.py: model, optimizer, averaging, posthoc, iter_num,
    tokens_seen, sampler, model_args, config). Also writes the trajectory's files: snapshots,
    post-hoc profiles and averaged snapshots. Nothing non-finite is ever saved."""

    def __init__(self, run, cfg, runtime):
        self.run, self.cfg, self.runtime = run, cfg, runtime
        self.out_dir = Path(cfg.out_dir)
        self.saved = (None, None)   # (step, path) of the newest resume checkpoint written
        self.identity = None        # {"id", "parent"}: the run every file records (load)

    # ------------------------------------------------------------------------ restore

    def load(self, start):
        """Continue from the Checkpoint `start` (None: nothing to load). Resuming
        (init_from='resume') must continue every average with the same settings; a branch
        continues the averages whose settings are unchanged and starts the others. Also sets
        the run's identity (run_identity)."""
        self.identity = run_identity(start, self.cfg, self.runtime)
        if start is None:
            return
        run, master = self.run, self.runtime.master
        checkpoint.load_model_state(run.model, start.weights, start.path)  # into the flat buffer
        if start.optimizer is not None:
            try:
                run.optimizer.load_state_dict(start.optimizer)
            except ValueError as e:
                raise CheckpointError(f"{start.path}: cannot continue its optimizer state: "
                                      f"{e}") from None
            wpe = run.model.transformer.wpe.weight   # a cropped context (crop_context): the
            moments = run.optimizer.state.get(wpe, {})   # moments of the positions kept
            for key, value in moments.items():
                if torch.is_tensor(value) and value.dim() == 2 and len(value) > len(wpe):
                    moments[key] = value[:len(wpe)].clone()
        elif master:
            print(f"{start.path} has no optimizer state: starting AdamW moments from zero")
        strict = self.cfg.init_from == "resume"
        if start.averaging:
            loaded = run.online.load_state_dict(start.averaging, start.path, strict=strict)
            if master and loaded:
                print(f"continuing the {', '.join(loaded)} average(s) from {start.path}")
        if start.posthoc:
            run.posthoc.load_state_dict(start.posthoc, start.path, strict=strict)
        run.state.load_state_dict({"iter_num": start.step or 0,
                                   "tokens_seen": start.tokens_seen or 0})

    # ------------------------------------------------------------------------ save

    def check_finite(self, loss=None):
        """NonFiniteLossError unless the last loss and every state tensor are finite."""
        run, runtime = self.run, self.runtime
        if loss is not None and not math.isfinite(all_reduce_mean(loss, runtime)):
            raise non_finite_error("the training loss is not finite", run.state.iter_num,
                                   self.out_dir)
        if not state_is_finite(run.flat, run.optimizer, run.online, runtime, run.posthoc):
            raise non_finite_error("the weights, optimizer or averager state are not finite",
                                   run.state.iter_num, self.out_dir)

    def save(self, loss=None):
        """The resume checkpoint of this step (once per step; every rank takes part: the
        averages' shards are gathered). Returns its path."""
        run, runtime, step = self.run, self.runtime, self.run.state.iter_num
        if self.saved[0] == step:
            return self.saved[1]
        self.check_finite(loss)
        payload = {"model": checkpoint.model_state(run.model),
                   "optimizer": run.optimizer.state_dict(),
                   "averaging": run.online.state_dict(),   # collectives under DDP
                   "posthoc": run.posthoc.state_dict(),
                   **run.state.state_dict(),
                   "sampler": {"seed": self.cfg.seed, "next_step": step},
                   "model_args": run.model_args, "config": dataclasses.asdict(self.cfg),
                   "run": self.identity, "data": run.data}
        path = checkpoint.resume_path(self.out_dir, step)
        if runtime.master:
            previous = checkpoint.latest_resume(self.out_dir)
            try:
                checkpoint.save_resume(self.out_dir, payload, self.cfg.keep_last)
            except WriteError as e:
                raise WriteError(f"{e}; the newest resume checkpoint is "
                                 f"{previous or 'none yet'}") from None
        self.saved = (step, path)
        return path

    def save_snapshot(self, raw=True, averaged=False, loss=None):
        """The raw weights to snapshots/ and the post-hoc profiles to posthoc/ (once they have
        averaged anything: not at their burn-in step); with `averaged`, each average to
        averaged/<method>/step_N.safetensors."""
        run, master = self.run, self.runtime.master
        state, args = run.state, run.model_args
        self.check_finite(loss)
        if raw and master:
            checkpoint.save_snapshot(self.out_dir / "snapshots", run.model, state.iter_num,
                                     state.tokens_seen, args, extra={"data": run.data},
                                     run=self.identity)
        if raw and run.posthoc.names and all(a.step is not None and a.step > a.tau
                                             for a in run.posthoc.averagers.values()):
            profiles = []
            for name, averager in run.posthoc.averagers.items():
                with run.posthoc.swapped_in(name):  # a collective under DDP
                    if master:
                        profiles.append((profile_info(name, averager), {
                            k: v.to("cpu", torch.float32, copy=True)
                            for k, v in checkpoint.model_state(run.model).items()}))
            if master:
                checkpoint.save_posthoc(self.out_dir / "posthoc", profiles, state.iter_num,
                                        state.tokens_seen, args, run=self.identity)
        for name in run.online.ready() if averaged else []:
            with run.online.swapped_in(name):  # a collective under DDP
                if master:
                    checkpoint.save_snapshot(
                        self.out_dir / "averaged" / name, run.model, state.iter_num,
                        state.tokens_seen, args,
                        extra={"averager": name, "hparams": run.online.averagers[name].hparams,
                               "data": run.data},
                        run=self.identity)


def run_identity(start, cfg, runtime):
    """{"id", "parent"} of this run, the same on every rank: a resume keeps the id of the
    checkpoint it continues (a checkpoint written before runs had ids gets a new one); a new
    run takes a new id, and a branch records the run and step it starts from as its parent."""
    saved = start.run if start is not None else None
    if cfg.init_from == "resume" and saved is not None:
        identity = saved
    else:
        parent = None if start is None else {"id": saved["id"] if saved else None,
                                             "step": start.step or 0}
        identity = {"id": new_run_id(), "parent": parent}
    if runtime.ddp:   # rank 0's: ids are random
        shared = [identity]
        torch.distributed.broadcast_object_list(shared, src=0, group=runtime.control_group)
        identity = shared[0]
    return identity


def profile_info(name, averager):
    """What a posthoc file records of each profile (checkpoint.save_posthoc)."""
    return {"name": name, "sigma_rel": averager.sigma_rel, "gamma": averager.gamma,
            "update_after": averager.tau, "update_freq": averager.phi,
            "last_update": averager.step}


def state_is_finite(flat, optimizer, online, runtime, posthoc=None):
    """Whether the weights, the optimizer state and the averagers' (and post-hoc profiles')
    state are all finite, on every rank: one sum per tensor (the weights are one flat buffer),
    one host sync (integrity.all_finite), and one all-reduce under DDP. Called before anything
    is saved."""
    tensors = [flat.buffer] + online.state_tensors()
    tensors += posthoc.state_tensors() if posthoc is not None else []
    tensors += [v for s in optimizer.state.values() for v in s.values()
                if torch.is_tensor(v) and v.is_floating_point()]
    ok = 1.0 if integrity.all_finite(tensors) else 0.0
    if runtime.ddp:
        ok = all_reduce_mean(ok, runtime)
    return ok == 1.0


def newest_finite_checkpoint(out_dir):
    """The newest resume checkpoint in out_dir whose every tensor (weights, optimizer, averagers)
    is finite, checked by reading it, or None."""
    for path in reversed(checkpoint.list_resume_checkpoints(out_dir)):
        try:
            record = checkpoint.read_checkpoint(path)
        except CheckpointError:
            continue
        if integrity.all_finite(record.tensors()):   # read_checkpoint checked them too
            return path
    return None


def non_finite_error(what, step, out_dir):
    good = newest_finite_checkpoint(out_dir)
    where = (f"The newest finite checkpoint is {good} (checked); continue from it with "
             f"--init_from=resume after removing the later ones, or branch off it with "
             f"--init_from={good}" if good else "No finite checkpoint exists in " + str(out_dir))
    return NonFiniteLossError(f"{what} at step {step}; nothing was saved. {where}. Lower "
                              f"--learning_rate, raise --warmup_iters or set --grad_clip.")


# ---------------------------------------------------------------------------------------------
# the run's folder

@contextmanager
def claimed_out_dir(cfg, runtime, log, start_step=0, run_id=None):
    """`with claimed_out_dir(cfg, runtime, log, start_step, run_id):` the run owns out_dir (rank
    0 holds the lock; every rank learns whether it could): refuse one that another run is using
    or, for a new run, that holds another run's artifacts (a run that crashed before its first
    resume checkpoint excepted: its files are moved aside); keep one timeline (a resume from
    start_step moves the later files of the abandoned one aside, run_dir.set_aside); remove
    the temporary files of interrupted writes; start the log's W&B run (before anything is
    written, so a wandb.init that fails leaves out_dir usable) and end it with the block."""
    lock, error = None, None
    if runtime.master:
        try:
            lock = OutDirLock(cfg.out_dir).acquire()
            if cfg.init_from != "resume":
                # again, now that no other run can write
                crashed = refuse_to_overwrite(cfg.out_dir)
                if crashed is not None:
                    print(f"{cfg.out_dir} holds run {crashed.run_id or '(no id)'}, which stopped "
                          f"at step {crashed.last_step} before its first resume checkpoint "
                          f"(step {crashed.first_checkpoint}): starting over as a new run"
                          f"{f' {run_id}' if run_id else ''}; "
                          f"{set_aside(cfg.out_dir)}")
            else:
                moved = set_aside(cfg.out_dir, after_step=start_step)
                if moved:
                    print(moved)
            removed, size = remove_leftover_temporaries(cfg.out_dir)
            if removed:
                print(f"removed {removed} temporary file(s) of interrupted writes "
                      f"({size / 2**20:.1f} MiB) from {cfg.out_dir}")
            log.start()
        except UserError as e:
            if lock is not None:
                lock.release()
            error = e
    if runtime.ddp and all_reduce_mean(1.0 if error else 0.0, runtime) > 0:
        error = error or UserError(f"rank 0 could not take out_dir {cfg.out_dir}")
    if error is not None:
        raise error
    failed = True
    try:
        yield
        failed = False
    finally:
        log.close(failed=failed)
        if lock is not None:
            lock.release()


def check_shared_out_dir(cfg, runtime):
    """Under torchrun every rank reads the checkpoint it resumes from, so each must see rank 0's
    newest one: out_dir is one file system shared by every node, mounted at the same path."""
    if not (runtime.ddp and cfg.init_from == "resume"):
        return
    newest = checkpoint.latest_resume(cfg.out_dir)
    seen = [None] * runtime.world_size
    dist.all_gather_object(seen, (socket.gethostname(), newest.name if newest else None),
                           group=runtime.control_group)
    for rank, (host, name) in enumerate(seen):
        if name != seen[0][1]:
            raise OutDirError(
                f"rank {rank} on {host} sees {name or 'no resume checkpoint'} as the newest in "
                f"{cfg.out_dir}, rank 0 on {seen[0][0]} sees {seen[0][1] or 'none'}: out_dir must "
                f"be one file system that every node mounts at the same path (a network file "
                f"system that caches listings may need a minute after the last write)")


@contextmanager
def lost_contact_reported(cfg, runtime):
    """`with lost_contact_reported(cfg, runtime):` a collective that fails because another
    process of the run died or froze (runtime.lost_contact) becomes one line from each node,
    naming the newest resume checkpoint to start every node again from; other errors pass."""
    try:
        yield
    except RuntimeError as e:
        lost = lost_contact(e, runtime, cfg.dist_timeout)
        if lost is None:
            raise
        newest = checkpoint.latest_resume(cfg.out_dir)
        raise LostContact(f"{lost} " + (
            f"The newest resume checkpoint is {newest}: start every node again with "
            f"--init_from=resume" if newest else f"{cfg.out_dir} holds no resume checkpoint "
            f"yet")) from None
