"""
Train a GPT on one CPU, one GPU, or many GPUs with DDP.

    python train.py                                   # default: small char model on Shakespeare, CPU ok
    python train.py config/train_shakespeare_char.py --max_iters=500
    torchrun --standalone --nproc_per_node=8 train.py config/train_small.py

Every knob is a field of TrainConfig below, with its default and a comment; config files and
--key=value arguments override them (configurator.py). The loop reads top to bottom in train(),
but each piece (runtime setup, model/optimizer restore, one training step, evaluation) is a
function of its own, so tests and bench.py call them directly.

What makes a resumed run bitwise-identical to an uninterrupted one: the batch of every micro-step
and the dropout RNG are pure functions of (seed, step, ...), the LR is a pure function of the
step, and the checkpoint holds model + optimizer + step. Nothing else carries state.
"""

import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import schedules
from configurator import load_config, save_config
from dataloader import TokenDataset, get_batch, micro_batch_seed, to_device
from flat_params import FlatParameters
from model import GPT, GPTConfig, NAMED_SIZES, device_peak_flops
from online_averaging import AveragingConfig, OnlineAveraging, averager_hparams

REPO = Path(__file__).resolve().parent


@dataclass
class TrainConfig(AveragingConfig):
    # I/O
    out_dir: str = "out/shakespeare_char"
    eval_interval: int = 250       # evaluate train/val loss every this many steps (and at the end)
    eval_iters: int = 100          # batches per split per evaluation (a fixed set: same every time)
    log_interval: int = 10         # print/log the training loss every this many steps
    ckpt_interval: int = 250       # write a resume checkpoint every this many steps (and at the end)
    keep_last: int = 2             # resume checkpoints to keep (0 = all); snapshots are never pruned
    snapshot_interval: int = 0     # model-only snapshot to out_dir/snapshots every N steps (0 = off)
    init_from: str = "scratch"     # 'scratch' | 'resume' (latest in out_dir) | path to a .pt/.safetensors
    stop_iter: int | None = None   # end this invocation after this step, with a resume checkpoint;
                                   # the schedule still runs to max_iters (for time-limited jobs)
    # logging
    wandb_log: bool = False        # also log to Weights & Biases (WANDB_MODE=offline is honoured)
    wandb_project: str = "weight-averaging"
    wandb_run_name: str | None = None
    # data
    dataset: str = "shakespeare_char"  # a prepared folder under data/
    data_dir: str | None = None    # explicit path to a prepared dataset (overrides `dataset`)
    batch_size: int = 12           # sequences per micro-batch per process
    block_size: int = 64           # context length
    gradient_accumulation_steps: int = 1  # micro-batches per step, summed over all DDP ranks
    # model (architecture keys are taken from the checkpoint when resuming or branching)
    model_size: str | None = None  # 'gpt2' | 'gpt2-medium' | 'gpt2-large': sets n_layer/n_head/n_embd
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    vocab_size: int | None = None  # None: the dataset's vocab size (set 50304 for GPT-2 BPE speed)
    # optimizer
    optimizer: str = "adamw"       # 'adamw' | 'coupled_adam' (AdamW, Coupled Adam on the embedding)
    learning_rate: float = 1e-3    # peak LR
    weight_decay: float = 0.1      # applied to >=2-D tensors only
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0         # clip the global gradient norm to this (0 = off)
    coupled_adam_scale: float = 1.0  # coupled_adam: c times the vocabulary-mean second moment of
                                   # the embedding (1 = the paper; its scaled runs use powers of 2)
    embedding_weight_decay: float | None = None  # decoupled weight decay of the token embedding
                                   # (= the tied LM head). None: adamw decays it with weight_decay
                                   # like every matrix, coupled_adam does not (0, the paper). The
                                   # paper compares the two with 0 in both (config/train_small_
                                   # coupled_adam.py and train_small_adamw_baseline.py)
    # learning-rate schedule (schedules.py): lr = learning_rate * multiplier(step)
    lr_schedule: str = "cosine"    # 'constant' | 'cosine' | 'wsd' (warmup-stable-decay)
    max_iters: int = 2000          # total optimizer steps
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # cosine: reaches min_lr here (None = max_iters)
    min_lr: float = 1e-4           # cosine floor
    cooldown_frac: float = 0.2     # wsd: cooldown over the last 20% of max_iters ...
    cooldown_start: int | None = None  # ... or from this step
    cooldown_shape: str = "1-sqrt"  # wsd: 'linear' | 'cosine' | '1-sqrt' | 'square'
    final_lr_frac: float = 0.0     # wsd: LR at the end of the cooldown, as a fraction of the peak
    # weight averaging during training (averaging.py; every method's keys and defaults are in the
    # table at the top of averaging.py, e.g. --bema_lag=5 --ema_decay=0.99). At each eval the raw
    # and every averaged model are evaluated on the same val batches (val_loss/raw, val_loss/ema..)
    averaging: str = "ema,bema,lawa"  # comma-separated subset of ema,bema,dema,ouema,swa,lawa,wa
    save_averaged: bool = False    # also write out_dir/averaged/<method>/step_N.safetensors at
                                   # every snapshot and at the end
    # defaults for this 2000-step default run (the papers' values are in averaging.py)
    ema_decay: float = 0.995       # EMA half-life ~140 steps
    lawa_k: int = 5                # LAWA: mean of the 5 latest checkpoints ...
    lawa_interval: int = 100       # ... spaced 100 steps apart
    # system
    device: str = "auto"           # 'auto' (cuda if available) | 'cpu' | 'cuda' | 'cuda:1' ...
    dtype: str = "auto"            # 'auto' (bfloat16 autocast on CUDA, float32 on CPU) | 'float32' | 'bfloat16'
    compile: bool = False          # torch.compile the model
    seed: int = 1337
    peak_flops: float | None = None  # device peak FLOP/s for MFU (None: looked up for A100/H100/H200)

    def __post_init__(self):
        positive = ["eval_interval", "eval_iters", "log_interval", "ckpt_interval", "batch_size",
                    "block_size", "gradient_accumulation_steps", "n_layer", "n_head", "n_embd",
                    "max_iters"]
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0")
        for key in ("keep_last", "snapshot_interval", "warmup_iters", "grad_clip"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 0")
        if self.embedding_weight_decay is not None and not self.embedding_weight_decay >= 0:
            raise ValueError(f"embedding_weight_decay={self.embedding_weight_decay} must be >= 0, "
                             f"or None for each optimizer's default (adamw: weight_decay, "
                             f"coupled_adam: 0)")
        if self.model_size is not None and self.model_size not in NAMED_SIZES:
            raise ValueError(f"model_size={self.model_size!r} is unknown; use one of "
                             f"{sorted(NAMED_SIZES)} or None")
        if self.optimizer not in ("adamw", "coupled_adam"):
            raise ValueError(f"optimizer={self.optimizer!r} is unknown; use 'adamw' or "
                             f"'coupled_adam'")
        if not self.coupled_adam_scale > 0:
            raise ValueError(f"coupled_adam_scale={self.coupled_adam_scale} must be > 0 "
                             f"(1 = the paper's Coupled Adam)")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}: use 'auto', 'float32' or 'bfloat16' "
                             "(float16 would need loss scaling, which this trainer does not do)")
        if self.stop_iter is not None and not 0 < self.stop_iter <= self.max_iters:
            raise ValueError(f"stop_iter={self.stop_iter} must be in (0, max_iters={self.max_iters}]")
        schedules.from_config(self)  # raises on an impossible schedule, naming the key
        averager_hparams(self)       # raises on an unknown method or impossible hyperparameter


# ---------------------------------------------------------------------------------------------
# runtime: device, precision, distributed

@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    autocast_dtype: torch.dtype | None = None  # None: plain float32

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def init_runtime(cfg):
    """Pick the device and precision; join the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device_name = cfg.device
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={cfg.device!r} but CUDA is not available; use --device=cpu")
        if world_size > 1:
            device_name = f"cuda:{local_rank}"
        elif device_name == "cuda":
            # an explicit index: set_device rejects a bare "cuda", and the flat buffers, the
            # averagers and the checkpoints compare devices, where cuda != cuda:0
            device_name = f"cuda:{torch.cuda.current_device()}"
        torch.cuda.set_device(device_name)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    device = torch.device(device_name)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
    return Runtime(device, rank, local_rank, world_size, autocast_dtype)


def teardown(runtime):
    if runtime.ddp and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value, runtime):
    """Mean of a float over ranks (a host sync: only at log/eval time)."""
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=runtime.device)
    if runtime.ddp:
        dist.all_reduce(tensor)
        tensor /= runtime.world_size
    return tensor.item()


# ---------------------------------------------------------------------------------------------
# data

def open_dataset(cfg):
    data_dir = Path(cfg.data_dir) if cfg.data_dir else REPO / "data" / cfg.dataset
    return TokenDataset(data_dir, prepare_hint=f"python data/{cfg.dataset}/prepare.py"
                        if not cfg.data_dir else None)


def micro_steps_per_rank(cfg, runtime):
    if cfg.gradient_accumulation_steps % runtime.world_size:
        raise ValueError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be "
                         f"a multiple of the number of processes ({runtime.world_size})")
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
            x, y = get_batch(data.splits["train"], cfg.block_size, cfg.batch_size, seed)
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


def build(cfg, runtime, data):
    """Model, optimizer, TrainState, model_args and the FlatParameters the model's weights live
    in, from scratch, the latest resume checkpoint, or a file."""
    loaded, state = None, TrainState()
    if cfg.init_from == "resume":
        path = checkpoint.latest_resume(cfg.out_dir)
        if path is None:
            raise FileNotFoundError(f"init_from='resume' but {cfg.out_dir} holds no resume "
                                    f"checkpoint (ckpt_*.pt); use --init_from=scratch")
        loaded = checkpoint.load_weights(path)
    else:
        _refuse_to_overwrite(cfg)
        if cfg.init_from != "scratch":  # branch off a checkpoint or snapshot, e.g. a cooldown
            path = Path(cfg.init_from)
            loaded = checkpoint.load_weights(path)

    model_args = model_args_from_config(cfg, data)
    if loaded is not None:
        weights, info = loaded
        saved_args = info["model_args"] or {}
        # architecture comes from the file; dropout stays a training choice of this run
        model_args = {**model_args, **{k: v for k, v in saved_args.items() if k != "dropout"}}
        state = TrainState(info["step"], info["tokens_seen"] or 0, str(path), info["averaging"])
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
        checkpoint.load_model_state(model, weights, path)   # copies into the flat buffer
        if info["optimizer"] is not None:
            optimizer.load_state_dict(info["optimizer"])
        elif runtime.master:
            print(f"{path} has no optimizer state: starting AdamW moments from zero")
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


def wrap_model(model, cfg, runtime):
    """torch.compile and/or DDP around the bare model (checkpoints always save the bare one)."""
    if cfg.compile:
        model = torch.compile(model)
    if runtime.ddp:
        model = DDP(model, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None)
    return model


def _refuse_to_overwrite(cfg):
    if checkpoint.list_resume_checkpoints(cfg.out_dir):
        raise FileExistsError(
            f"{cfg.out_dir} already holds resume checkpoints of another run; continue it with "
            f"--init_from=resume, or write this run elsewhere with --out_dir=...")


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


@torch.no_grad()
def evaluate(model, data, cfg, runtime, splits=("train", "val")):
    """Mean loss over a fixed set of eval_iters batches per split, split across ranks: the same
    batches at every call, so losses of different weights are paired comparisons."""
    model.eval()
    losses = {}
    for split in splits:
        stream = "eval_train" if split == "train" else split
        total = torch.zeros((), dtype=torch.float64, device=runtime.device)
        for i in range(runtime.rank, cfg.eval_iters, runtime.world_size):
            x, y = get_batch(data.splits[split], cfg.block_size, cfg.batch_size,
                             micro_batch_seed(cfg.seed, stream, 0, i))
            with runtime.autocast():
                _, loss = model(*to_device(x, y, runtime.device))
            total += loss.double()
        if runtime.ddp:
            dist.all_reduce(total)
        losses[split] = total.item() / cfg.eval_iters
    model.train()
    return losses


# ---------------------------------------------------------------------------------------------
# logging and stopping

class MetricsLog:
    """stdout + out_dir/metrics.jsonl (+ wandb). Only rank 0 writes."""

    def __init__(self, cfg, runtime, resume_iter):
        self.active = runtime.master
        self.path = Path(cfg.out_dir) / "metrics.jsonl"
        self.wandb = None
        if not self.active:
            return
        if self.path.exists():  # drop records past the step we restart from: one consistent history
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _before_restart(json.loads(line), resume_iter)]
            checkpoint.atomic_write(self.path, lambda f: f.write(
                "".join(line + "\n" for line in keep).encode()))
        if cfg.wandb_log:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("wandb_log=True but wandb is not installed; "
                                  "pip install wandb, or --wandb_log=False") from e
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name,
                                    config=dataclasses.asdict(cfg))

    def write(self, record):
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["iter"])


def _before_restart(record, resume_iter):
    # the resumed run re-evaluates at its first step, so an eval record there is dropped too
    return record["iter"] < resume_iter or (record["iter"] == resume_iter
                                             and "val_loss" not in record)


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits at a step boundary.
    A second SIGINT interrupts at once."""

    def __init__(self):
        self.requested = None
        self._previous = {}

    def __enter__(self):
        if threading_main():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def check(self, runtime):
        """Agreed over ranks, so every rank stops at the same step (a collective: call rarely)."""
        flag = 1.0 if self.requested else 0.0
        return all_reduce_mean(flag, runtime) > 0 if runtime.ddp else bool(flag)


def threading_main():
    import threading
    return threading.current_thread() is threading.main_thread()


class NonFiniteLossError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# the loop

def train(cfg):
    runtime = init_runtime(cfg)
    try:
        return _train(cfg, runtime)
    finally:
        teardown(runtime)


def _train(cfg, runtime):
    data = open_dataset(cfg)
    micro_steps_per_rank(cfg, runtime)  # fail before any work if the batch does not divide
    model, optimizer, state, model_args, flat = build(cfg, runtime, data)
    online = build_averaging(cfg, runtime, flat, state)
    raw_model, model = model, wrap_model(model, cfg, runtime)
    schedule = schedules.from_config(cfg)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * model_args["block_size"]
    peak_flops = device_peak_flops(runtime.device, cfg.peak_flops)
    out_dir = Path(cfg.out_dir)
    if runtime.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.json")
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters, {tokens_per_iter:,} tokens/step, "
              f"start at step {state.iter_num} ({state.source}), device {runtime.device}, "
              f"world size {runtime.world_size}")
        if online.names:
            print(f"averaging {', '.join(online.names)}: "
                  f"{online.memory_bytes() / 2**20:.1f} MiB of state per rank")
    log = MetricsLog(cfg, runtime, state.iter_num)
    batches = train_batches(data, cfg, runtime, state.iter_num)
    last_loss, last_eval, stopped_by, saved_at = None, None, None, {}

    def save_resume():
        if saved_at.get("step") == state.iter_num:
            return saved_at["path"]
        if last_loss is not None and not math.isfinite(all_reduce_mean(last_loss, runtime)):
            raise NonFiniteLossError(f"loss is not finite at step {state.iter_num}; not saving")
        saved_at.update(step=state.iter_num, path=checkpoint.resume_path(out_dir, state.iter_num))
        averaging_state = online.state_dict()  # gathers the DDP shards: every rank takes part
        if runtime.master:
            checkpoint.save_resume(out_dir, {
                "model": checkpoint.model_state(model),
                "optimizer": optimizer.state_dict(),
                "averaging": averaging_state,
                "iter_num": state.iter_num, "tokens_seen": state.tokens_seen,
                "model_args": model_args, "config": dataclasses.asdict(cfg),
                "sampler": {"seed": cfg.seed, "next_step": state.iter_num},
            }, cfg.keep_last)
        return saved_at["path"]

    def save_snapshots(raw, averaged):
        """The raw weights to snapshots/, each average to averaged/<method>/step_N.safetensors."""
        if raw and runtime.master:
            checkpoint.save_snapshot(out_dir / "snapshots", raw_model, state.iter_num,
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
        losses = evaluate(eval_model, data, cfg, runtime)
        averaged = {}
        for name in online.ready():
            with online.swapped_in(name):
                averaged[name] = evaluate(eval_model, data, cfg, runtime, splits=("val",))["val"]
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
    with StopSignal() as stop:
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

            if cfg.snapshot_interval and state.iter_num % cfg.snapshot_interval == 0:
                save_snapshots(raw=True, averaged=cfg.save_averaged)
            if state.iter_num % cfg.log_interval == 0:
                loss = all_reduce_mean(last_loss, runtime)  # the one host sync per log interval
                if not math.isfinite(loss):
                    latest = checkpoint.latest_resume(out_dir)
                    raise NonFiniteLossError(
                        f"training loss is {loss} at step {state.iter_num}; stopped. The last good "
                        f"checkpoint ({latest or 'none written yet'}) is intact. Lower "
                        f"--learning_rate, raise --warmup_iters or set --grad_clip.")
                elapsed = time.perf_counter() - timer
                ms = 1000 * elapsed / timed_steps
                mfu = None if peak_flops is None else raw_model.estimate_mfu(
                    tokens_per_iter * timed_steps / elapsed, peak_flops)
                if runtime.master:
                    mfu_text = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
                    print(f"iter {state.iter_num}: loss {loss:.4f}, lr {lr:.2e}, {ms:.1f} ms/iter,"
                          f" {tokens_per_iter * 1000 / ms:,.0f} tok/s, mfu {mfu_text}")
                log.write({"iter": state.iter_num, "lr": lr, "loss": loss,
                           "tokens": state.tokens_seen, "ms_per_iter": ms, "mfu": mfu})
                timer, timed_steps = time.perf_counter(), 0
            if state.iter_num % cfg.ckpt_interval == 0 and state.iter_num < cfg.max_iters:
                save_resume()
            # single process: check the flag every step; DDP: only where ranks sync anyway
            if (not runtime.ddp or state.iter_num % cfg.log_interval == 0) and stop.check(runtime):
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
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear at once under tee/nohup
    train(load_config(TrainConfig, sys.argv[1:]))
