"""
Train a GPT on one CPU, one GPU, or many GPUs with DDP, with weight averages kept alongside.

    python train.py                                   # default: small char model on Shakespeare, CPU ok
    python train.py config/train_shakespeare_char.py --max_iters=500
    torchrun --standalone --nproc_per_node=8 train.py config/train_small.py
    python train.py --help                            # every key, its default and what it does

Every knob is a field of TrainConfig below, with its default and a comment; config files and
--key=value arguments override them (configurator.py). The loop reads top to bottom in train(),
but each piece (model/optimizer restore, one training step, the evaluation batches) is a function
of its own, so tests and bench.py call them directly. The device and process group are
runtime.py's, the data and the evaluation loss dataloader.py's, the files checkpoint.py's.

What makes a resumed run bitwise-identical to an uninterrupted one: the batch of every micro-step
and the dropout RNG are pure functions of (seed, step, ...), the LR is a pure function of the
step, and the checkpoint holds model + optimizer + averagers + step. Nothing else carries state.
"""

import dataclasses
import math
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import hf_gpt2
import schedules
from configurator import (ConfigError, UserError, check_finite_numbers, main, save_config,
                          was_given)
from dataloader import (EvalBatches, evaluate_loss, get_batch, micro_batch_seed, open_dataset,
                        to_device)
from flat_params import FlatParameters
from model import GPT, GPTConfig, NAMED_SIZES, device_peak_flops
from online_averaging import AveragingConfig, OnlineAveraging, averager_hparams, posthoc_profiles
from report import format_duration
from run_dir import (MetricsLog, OutDirError, OutDirLock, latest_resume_or_error,
                     refuse_to_overwrite, remove_leftover_temporaries)
from runtime import (SAME_FILES, LostContact, StopSignal, agree, all_reduce_mean, check_device,
                     check_dtype, init_runtime, lost_contact, teardown)


@dataclass
class TrainConfig(AveragingConfig):
    # I/O
    out_dir: str = "out/shakespeare_char"  # checkpoints, snapshots, config.json, metrics.jsonl
    eval_interval: int = 250       # evaluate train/val loss every this many steps (and at the end)
    eval_iters: int = 100          # batches per split per evaluation (a fixed set: same every time)
    log_interval: int = 10         # print/log the training loss every this many steps
    ckpt_interval: int = 250       # write a resume checkpoint every this many steps (and at the end)
    keep_last: int = 2             # resume checkpoints to keep (0 = all); snapshots are never pruned
    snapshot_interval: int = 0     # model-only snapshot to out_dir/snapshots every N steps (0 = off)
    init_from: str = "scratch"     # 'scratch' | 'resume' (latest in out_dir) | a .pt/.safetensors |
                                   # 'gpt2' ... 'gpt2-xl' | a transformers GPT-2 folder
    stop_iter: int | None = None   # end this invocation after this step, with a resume checkpoint;
                                   # the schedule still runs to max_iters (for time-limited jobs)
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
    dtype: str = "auto"            # 'auto' (bfloat16 autocast on CUDA, float32 on CPU) | 'float32' | 'bfloat16'
    compile: bool = False          # torch.compile the model
    seed: int = 1337               # initial weights, batches and dropout are functions of it
    peak_flops: float | None = None  # device peak FLOP/s for MFU (None: looked up for A100/H100/H200)
    dist_timeout: float = 600      # under torchrun: seconds a rank waits for the others before the
                                   # run stops with an error (a node died or froze); more than
                                   # rank 0 takes to write a checkpoint

    def __post_init__(self):
        positive = ["eval_interval", "eval_iters", "log_interval", "ckpt_interval", "batch_size",
                    "block_size", "gradient_accumulation_steps", "n_layer", "n_head", "n_embd",
                    "max_iters"]
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0")
        for key in ("keep_last", "snapshot_interval", "warmup_iters", "grad_clip",
                    "weight_decay", "seed", "min_lr"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 0")
        if self.embedding_weight_decay is not None and not self.embedding_weight_decay >= 0:
            raise ValueError(f"embedding_weight_decay={self.embedding_weight_decay} must be >= 0, "
                             f"or None for each optimizer's default (adamw: weight_decay, "
                             f"coupled_adam: 0)")
        check_finite_numbers(self)
        if not self.out_dir.strip():
            raise ValueError("out_dir is empty; give the run a folder, e.g. --out_dir=out/run")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be in [0, 1)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout={self.dist_timeout} must be > 0 (seconds)")
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ValueError(f"peak_flops={self.peak_flops} must be > 0 (FLOP/s), or None")
        check_device(self.device)
        if self.model_size is not None and self.model_size not in NAMED_SIZES:
            raise ValueError(f"model_size={self.model_size!r} is unknown; use one of "
                             f"{sorted(NAMED_SIZES)} or None")
        if self.optimizer not in ("adamw", "coupled_adam"):
            raise ValueError(f"optimizer={self.optimizer!r} is unknown; use 'adamw' or "
                             f"'coupled_adam'")
        if not self.coupled_adam_scale > 0:
            raise ValueError(f"coupled_adam_scale={self.coupled_adam_scale} must be > 0 "
                             f"(1 = the paper's Coupled Adam)")
        check_dtype(self.dtype)
        if self.stop_iter is not None and not 0 < self.stop_iter <= self.max_iters:
            raise ValueError(f"stop_iter={self.stop_iter} must be in (0, max_iters={self.max_iters}]")
        schedules.from_config(self)  # raises on an impossible schedule, naming the key
        averager_hparams(self)       # raises on an unknown method or impossible hyperparameter
        posthoc_profiles(self)       # raises on an impossible width, burn-in or period


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


# ---------------------------------------------------------------------------------------------
# model, optimizer and where to start

def model_args_from_config(cfg, data):
    shape = dict(NAMED_SIZES[cfg.model_size]) if cfg.model_size else \
        dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    return dict(block_size=cfg.block_size, vocab_size=cfg.vocab_size or data.vocab_size,
                dropout=cfg.dropout, bias=cfg.bias, **shape)


@dataclass
class TrainState:
    iter_num: int = 0       # optimizer steps completed
    tokens_seen: int = 0
    source: str = "scratch"  # where the weights came from
    averaging: dict | None = None  # saved averager states to continue (from a resume checkpoint)
    posthoc: dict | None = None    # saved post-hoc profile states to continue (likewise)


ARCHITECTURE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


def load_start(cfg):
    """(cfg, the Checkpoint to start from or None). Resuming or branching keeps the file's
    architecture: a key the user gave (model_size, n_layer, n_head, n_embd, block_size,
    vocab_size, bias) must equal the file's, else a ConfigError naming it; the keys not given are
    set to the file's values in the returned cfg, so config.json, the batches and the token count
    describe the model that trains."""
    if cfg.init_from == "resume":
        loaded = checkpoint.read_checkpoint(latest_resume_or_error(cfg.out_dir))
    elif hf_gpt2.is_pretrained_source(cfg.init_from):   # gpt2 ... gpt2-xl, a transformers folder
        loaded = hf_gpt2.read_pretrained(cfg.init_from)
    elif cfg.init_from != "scratch":   # branch off a checkpoint or snapshot, e.g. a cooldown
        loaded = checkpoint.read_checkpoint(cfg.init_from)
    else:
        return cfg, None
    saved, given = loaded.model_args, {}
    if cfg.model_size is not None and was_given(cfg, "model_size"):
        given = {key: (value, "model_size") for key, value in NAMED_SIZES[cfg.model_size].items()}
    for key in ARCHITECTURE_KEYS:
        if was_given(cfg, key) and getattr(cfg, key) is not None:
            given[key] = (getattr(cfg, key), key)
    for key, (value, setting) in given.items():
        if key in saved and saved[key] != value:
            shown = f"{setting}={getattr(cfg, setting)!r}"
            raise ConfigError(f"{shown} but {loaded.path} holds a model with {key}="
                              f"{saved[key]!r}; resuming or branching keeps the saved "
                              f"architecture: drop --{setting}, or start a new run from scratch")
    adopted = {key: saved[key] for key in ARCHITECTURE_KEYS if key in saved}
    return dataclasses.replace(cfg, model_size=None, **adopted), loaded


def build(cfg, runtime, data, loaded=None):
    """Model, optimizer, TrainState, model_args and the FlatParameters the model's weights live
    in, from scratch or from the Checkpoint `loaded` (by default: load_start's)."""
    if loaded is None:
        cfg, loaded = load_start(cfg)
    state = TrainState()
    model_args = model_args_from_config(cfg, data)
    if loaded is not None:
        # architecture comes from the file; dropout stays a training choice of this run
        model_args = {**model_args,
                      **{k: v for k, v in loaded.model_args.items() if k != "dropout"}}
        state = TrainState(loaded.step or 0, loaded.tokens_seen or 0, str(loaded.path),
                           loaded.averaging, loaded.posthoc)
    data.check_fits(model_args["block_size"], model_args["vocab_size"])

    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    model = GPT(GPTConfig(**model_args)).to(runtime.device)
    # on its device, before the optimizer, compile and DDP see it: all weights in one buffer
    flat = FlatParameters(model)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                           (cfg.beta1, cfg.beta2), runtime.device.type,
                                           cfg.optimizer, cfg.coupled_adam_scale,
                                           cfg.embedding_weight_decay)
    if loaded is not None:
        checkpoint.load_model_state(model, loaded.weights, loaded.path)   # into the flat buffer
        if loaded.optimizer is not None:
            try:
                optimizer.load_state_dict(loaded.optimizer)
            except ValueError as e:
                raise checkpoint.CheckpointError(f"{loaded.path}: cannot continue its optimizer "
                                                 f"state: {e}") from None
        elif runtime.master:
            print(f"{loaded.path} has no optimizer state: starting AdamW moments from zero")
    flat.check()
    return model, optimizer, state, model_args, flat


def build_averaging(cfg, runtime, flat, state):
    """The online averagers of cfg.averaging, continuing saved state where there is some, each
    initialised at this run's first step if that is its burn-in step."""
    online = OnlineAveraging(flat, averager_hparams(cfg), runtime.rank, runtime.world_size)
    if state.averaging:
        # resuming must continue the same averages; a branched run may average differently
        loaded = online.load_state_dict(state.averaging, state.source,
                                        strict=cfg.init_from == "resume")
        if runtime.master and loaded:
            print(f"continuing the {', '.join(loaded)} average(s) from {state.source}")
    online.start(state.iter_num)
    return online


def build_posthoc(cfg, runtime, flat, state):
    """The post-hoc EMA profiles (phema averagers named 'sigma_rel=0.05', ...; none when off),
    continuing saved state where there is some, else starting at posthoc_update_after."""
    profiles = posthoc_profiles(cfg)
    posthoc = OnlineAveraging(flat, profiles, runtime.rank, runtime.world_size, method="phema")
    loaded = []
    if state.posthoc:
        loaded = posthoc.load_state_dict(state.posthoc, state.source,
                                         strict=cfg.init_from == "resume")
    fresh = [name for name in profiles if name not in loaded]
    if fresh and cfg.posthoc_update_after < state.iter_num:
        raise ConfigError(
            f"posthoc_update_after={cfg.posthoc_update_after}, but this run starts at step "
            f"{state.iter_num} with no saved post-hoc profile {fresh[0]} to continue; set "
            f"--posthoc_update_after={state.iter_num} (or later) to start the profiles here, or "
            f"turn them off with --posthoc_sigma_rel=None")
    posthoc.start(state.iter_num)
    return posthoc


def profile_info(name, averager):
    """What a posthoc file records of each profile (checkpoint.save_posthoc)."""
    return {"name": name, "sigma_rel": averager.sigma_rel, "gamma": averager.gamma,
            "update_after": averager.tau, "update_freq": averager.phi,
            "last_update": averager.step}


def wrap_model(model, cfg, runtime):
    """torch.compile and/or DDP around the bare model (checkpoints always save the bare one)."""
    if cfg.compile:
        model = torch.compile(model)
    if runtime.ddp:
        model = DDP(model, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None)
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


def eval_batches(cfg):
    """The fixed evaluation batches of this run (dataloader.EvalBatches)."""
    return EvalBatches(cfg.eval_iters, cfg.batch_size, cfg.block_size, cfg.seed)


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the state became NaN or infinite; nothing non-finite is saved."""


def state_is_finite(flat, optimizer, online, runtime, posthoc=None):
    """Whether the weights, the optimizer state and the averagers' (and post-hoc profiles')
    state are all finite, on every rank: one reduction per tensor (the weights are one flat
    buffer), one host sync, and one all-reduce under DDP. Called before anything is saved."""
    tensors = [flat.buffer] + online.state_tensors()
    tensors += posthoc.state_tensors() if posthoc is not None else []
    tensors += [v for s in optimizer.state.values() for v in s.values()
                if torch.is_tensor(v) and v.is_floating_point()]
    ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all().double()
    if runtime.ddp:
        ok = torch.tensor([all_reduce_mean(ok.item(), runtime)])
    return bool(ok.item() == 1.0)


def newest_finite_checkpoint(out_dir):
    """The newest resume checkpoint in out_dir whose every tensor (weights, optimizer, averagers)
    is finite, checked by reading it, or None."""
    for path in reversed(checkpoint.list_resume_checkpoints(out_dir)):
        try:
            record = checkpoint.read_checkpoint(path)
        except checkpoint.CheckpointError:
            continue
        if all(torch.isfinite(t).all() for t in record.tensors() if t.is_floating_point()):
            return path
    return None


def non_finite_error(what, step, out_dir):
    good = newest_finite_checkpoint(out_dir)
    where = (f"The newest finite checkpoint is {good} (checked); continue from it with "
             f"--init_from=resume after removing the later ones, or branch off it with "
             f"--init_from={good}" if good else "No finite checkpoint exists in " + str(out_dir))
    return NonFiniteLossError(f"{what} at step {step}; nothing was saved. {where}. Lower "
                              f"--learning_rate, raise --warmup_iters or set --grad_clip.")


def claim_out_dir(cfg, runtime):
    """Take out_dir for this run (rank 0 holds the lock; every rank learns whether it could):
    refuse one that another run is using or, for a new run, that holds another run's artifacts;
    remove the temporary files of interrupted writes. Returns the lock (None on other ranks)."""
    lock, error = None, None
    if runtime.master:
        try:
            lock = OutDirLock(cfg.out_dir).acquire()
            if cfg.init_from != "resume":
                refuse_to_overwrite(cfg.out_dir)   # again, now that no other run can write
            removed, size = remove_leftover_temporaries(cfg.out_dir)
            if removed:
                print(f"removed {removed} temporary file(s) of interrupted writes "
                      f"({size / 2**20:.1f} MiB) from {cfg.out_dir}")
        except UserError as e:
            if lock is not None:
                lock.release()
            error = e
    if runtime.ddp and all_reduce_mean(1.0 if error else 0.0, runtime) > 0:
        error = error or UserError(f"rank 0 could not take out_dir {cfg.out_dir}")
    if error is not None:
        raise error
    return lock


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


# ---------------------------------------------------------------------------------------------
# the loop

def train(cfg):
    runtime = init_runtime(cfg.device, cfg.dtype, cfg.dist_timeout)
    try:
        return _train(cfg, runtime)
    except RuntimeError as e:   # a node died or froze: one line from each node, not a traceback
        lost = lost_contact(e, runtime, cfg.dist_timeout)
        if lost is None:
            raise
        newest = checkpoint.latest_resume(cfg.out_dir)
        raise LostContact(f"{lost} " + (
            f"The newest resume checkpoint is {newest}: start every node again with "
            f"--init_from=resume" if newest else f"{cfg.out_dir} holds no resume checkpoint "
            f"yet")) from None
    finally:
        teardown(runtime)


def _train(cfg, runtime):
    # everything that can fail on bad input fails here, before anything is written; on several
    # nodes a file that one node cannot see fails there alone, so every rank agrees on errors
    data = agree(runtime, lambda: open_dataset(cfg.dataset, cfg.data_dir), SAME_FILES)
    micro_steps_per_rank(cfg, runtime)
    check_shared_out_dir(cfg, runtime)
    cfg, loaded = agree(runtime, lambda: load_start(cfg), SAME_FILES)
    if cfg.init_from != "resume":
        refuse_to_overwrite(cfg.out_dir)
    model, optimizer, state, model_args, flat = build(cfg, runtime, data, loaded)
    online = build_averaging(cfg, runtime, flat, state)
    posthoc = build_posthoc(cfg, runtime, flat, state)
    log = MetricsLog(cfg, runtime.master)
    log.check()
    lock = claim_out_dir(cfg, runtime)
    try:
        return _loop(cfg, runtime, data, model, optimizer, state, model_args, flat, online,
                     posthoc, log)
    finally:
        if lock is not None:
            lock.release()


def _loop(cfg, runtime, data, model, optimizer, state, model_args, flat, online, posthoc, log):
    raw_model, model = model, wrap_model(model, cfg, runtime)
    schedule = schedules.from_config(cfg)
    evals = eval_batches(cfg)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * model_args["block_size"]
    peak_flops = device_peak_flops(runtime.device, cfg.peak_flops)
    out_dir = Path(cfg.out_dir)
    if runtime.master:
        save_config(cfg, out_dir / "config.json")
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters, {tokens_per_iter:,} tokens/step, "
              f"start at step {state.iter_num} ({state.source}), device {runtime.device}, "
              f"world size {runtime.world_size}")
        if online.names:
            print(f"averaging {', '.join(online.names)}: "
                  f"{online.memory_bytes() / 2**20:.1f} MiB of state per rank")
        if posthoc.names:
            print(f"post-hoc EMA profiles {', '.join(posthoc.names)} (from step "
                  f"{cfg.posthoc_update_after}, every {cfg.posthoc_update_freq} steps): written "
                  f"with every snapshot to {out_dir / 'posthoc'}, {len(posthoc.names)}x a "
                  f"snapshot's size")
    log.open(state.iter_num)
    batches = train_batches(data, cfg, runtime, state.iter_num)
    last_loss, last_eval, stopped_by, saved_at = None, None, None, {}

    def check_finite():
        if last_loss is not None and not math.isfinite(all_reduce_mean(last_loss, runtime)):
            raise non_finite_error("the training loss is not finite", state.iter_num, out_dir)
        if not state_is_finite(flat, optimizer, online, runtime, posthoc):
            raise non_finite_error("the weights, optimizer or averager state are not finite",
                                   state.iter_num, out_dir)

    def save_resume():
        if saved_at.get("step") == state.iter_num:
            return saved_at["path"]
        check_finite()
        saved_at.update(step=state.iter_num, path=checkpoint.resume_path(out_dir, state.iter_num))
        averaging_state = online.state_dict()  # gathers the DDP shards: every rank takes part
        posthoc_state = posthoc.state_dict()
        if runtime.master:
            previous = checkpoint.latest_resume(out_dir)
            try:
                checkpoint.save_resume(out_dir, {
                    "model": checkpoint.model_state(model),
                    "optimizer": optimizer.state_dict(),
                    "averaging": averaging_state,
                    "posthoc": posthoc_state,
                    "iter_num": state.iter_num, "tokens_seen": state.tokens_seen,
                    "model_args": model_args, "config": dataclasses.asdict(cfg),
                    "sampler": {"seed": cfg.seed, "next_step": state.iter_num},
                }, cfg.keep_last)
            except checkpoint.WriteError as e:
                raise checkpoint.WriteError(f"{e}; the newest resume checkpoint is "
                                            f"{previous or 'none yet'}") from None
        return saved_at["path"]

    def save_snapshots(raw, averaged):
        """The raw weights to snapshots/ and the post-hoc profiles to posthoc/ (once they have
        averaged anything: not at their burn-in step), each average to
        averaged/<method>/step_N.safetensors."""
        check_finite()
        if raw and runtime.master:
            checkpoint.save_snapshot(out_dir / "snapshots", raw_model, state.iter_num,
                                     state.tokens_seen, model_args)
        if raw and posthoc.names and all(a.step is not None and a.step > a.tau
                                         for a in posthoc.averagers.values()):
            profiles = []
            for name, averager in posthoc.averagers.items():
                with posthoc.swapped_in(name):  # a collective under DDP
                    if runtime.master:
                        profiles.append((profile_info(name, averager), {
                            k: v.to("cpu", torch.float32, copy=True)
                            for k, v in checkpoint.model_state(raw_model).items()}))
            if runtime.master:
                checkpoint.save_posthoc(out_dir / "posthoc", profiles, state.iter_num,
                                        state.tokens_seen, model_args)
        for name in online.ready() if averaged else []:
            with online.swapped_in(name):  # a collective under DDP
                if runtime.master:
                    checkpoint.save_snapshot(
                        out_dir / "averaged" / name, raw_model, state.iter_num,
                        state.tokens_seen, model_args,
                        extra={"averager": name, "hparams": online.averagers[name].hparams})

    def run_eval():
        # the module under DDP: forward passes here are per-rank, with no collectives inside
        eval_model = model.module if runtime.ddp else model
        losses = evaluate_loss(eval_model, data, evals, runtime)
        averaged = {}
        for name in online.ready():
            with online.swapped_in(name):
                averaged[name] = evaluate_loss(eval_model, data, evals, runtime,
                                               splits=("val",))["val"]
        if runtime.master:
            print(f"step {state.iter_num}: train loss {losses['train']:.4f}, "
                  f"val loss {losses['val']:.4f}")
            if averaged:
                print("    val loss  " + " | ".join(
                    f"{name} {loss:.4f}" for name, loss in [("raw", losses["val"]),
                                                           *averaged.items()]))
        log.write({"iter": state.iter_num, "tokens": state.tokens_seen,
                   "train_loss": losses["train"], "val_loss": losses["val"],
                   "val_loss/raw": losses["val"],
                   **{f"val_loss/{name}": loss for name, loss in averaged.items()}})
        return {**losses, "averaged": averaged}

    if cfg.snapshot_interval and state.iter_num == 0:
        save_snapshots(raw=True, averaged=False)   # θ_0: offline averages may start there too
    with StopSignal(runtime) as stop:
        timer, timed_steps = time.perf_counter(), 0
        while state.iter_num < cfg.max_iters:
            if state.iter_num % cfg.eval_interval == 0:
                last_eval = run_eval()
                timer, timed_steps = time.perf_counter(), 0  # keep eval time out of ms/iter
            seed_step(cfg, runtime, state.iter_num)
            lr = cfg.learning_rate * schedule(state.iter_num)
            last_loss = train_step(model, optimizer, batches, cfg, runtime, lr)
            state.iter_num += 1
            state.tokens_seen += tokens_per_iter
            timed_steps += 1
            online.update(state.iter_num)  # θ_s, s = updates applied; acts where it is due
            posthoc.update(state.iter_num)

            if cfg.snapshot_interval and state.iter_num % cfg.snapshot_interval == 0:
                save_snapshots(raw=True, averaged=cfg.save_averaged)
            if state.iter_num % cfg.log_interval == 0:
                loss = all_reduce_mean(last_loss, runtime)  # the one host sync per log interval
                if not math.isfinite(loss):
                    raise non_finite_error(f"the training loss is {loss}", state.iter_num,
                                           out_dir)
                elapsed = time.perf_counter() - timer
                ms = 1000 * elapsed / timed_steps
                mfu = None if peak_flops is None else raw_model.estimate_mfu(
                    tokens_per_iter * timed_steps / elapsed, peak_flops)
                if runtime.master:
                    mfu_text = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
                    eta = format_duration((cfg.max_iters - state.iter_num) * ms / 1000)
                    print(f"iter {state.iter_num}: loss {loss:.4f}, lr {lr:.2e}, {ms:.1f} ms/iter,"
                          f" {tokens_per_iter * 1000 / ms:,.0f} tok/s, mfu {mfu_text}, eta {eta}")
                log.write({"iter": state.iter_num, "lr": lr, "loss": loss,
                           "tokens": state.tokens_seen, "ms_per_iter": ms, "mfu": mfu})
                timer, timed_steps = time.perf_counter(), 0
            if state.iter_num % cfg.ckpt_interval == 0 and state.iter_num < cfg.max_iters:
                save_resume()
            if stop.poll():   # every rank stops at the same step, within two of a signal
                stopped_by = stop.requested or "signal"
                break
            if cfg.stop_iter is not None and state.iter_num >= cfg.stop_iter:
                stopped_by = "stop_iter"
                break

    if stopped_by is None:  # finished the schedule: final eval
        last_eval = run_eval()
        if cfg.save_averaged and not (cfg.snapshot_interval
                                      and state.iter_num % cfg.snapshot_interval == 0):
            save_snapshots(raw=False, averaged=True)
    path = save_resume()
    if runtime.master:
        how = f"stopped by {stopped_by}" if stopped_by else "done"
        print(f"{how} at step {state.iter_num}; resume checkpoint {path}")
    return {"iter_num": state.iter_num, "stopped_by": stopped_by, "checkpoint": path,
            "val_loss": last_eval["val"] if last_eval else None,
            "train_loss": last_eval["train"] if last_eval else None,
            "val_loss_averaged": last_eval["averaged"] if last_eval else {}}


if __name__ == "__main__":
    main(TrainConfig, train, __doc__)
