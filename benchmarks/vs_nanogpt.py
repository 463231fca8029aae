"""
Training throughput of this repository's train.py against nanoGPT's train.py, side by side on the
same prepared data with the same model, optimizer, schedule and evaluation settings.

    git clone https://github.com/karpathy/nanoGPT ../nanoGPT
    python -m benchmarks.vs_nanogpt --nanogpt_dir=../nanoGPT                   # CPU, 3 rounds
    python -m benchmarks.vs_nanogpt --nanogpt_dir=../nanoGPT --threads=1       # one thread each
    python -m benchmarks.vs_nanogpt --nanogpt_dir=../nanoGPT --device=cuda --preset=gpt2_124m

Each round runs both trainers as separate processes, one after the other, taking turns at going
first (round 1 nanoGPT first, round 2 ours first, ...), so that a slow spell of the machine is
shared out. Nothing is downloaded. The data is a folder prepared here (data/<name>/prepare.py);
for nanoGPT, whose train.py reads data/<dataset>/{train,val}.bin and meta.pkl relative to its
working directory and execs configurator.py from there, the script makes a working directory
inside out_dir with links to nanoGPT's configurator.py and to our .bin files, and a meta.pkl
(vocab_size, stoi, itos) built from our meta.json. The nanoGPT checkout itself is never written.

Presets (the same --key=value settings go to both trainers; their keys mean the same in both):
  baby       nanoGPT's "baby" Shakespeare char config, from its README's CPU example: 4 layers,
             4 heads, 128 wide, context 64, batch 12, no dropout, no bias; AdamW lr 1e-3,
             beta2 0.99, weight decay 0.1, clip 1.0; cosine, 100 warmup steps, to 1e-4 at 2000;
             eval every 250 steps on 100 batches per split. Ours: train.py's defaults, which are
             that config (so it also keeps EMA, BEMA and LAWA averages, as every default run does).
  gpt2_124m  GPT-2 124M's shapes (12 layers, 12 heads, 768 wide, context 1024, vocab 50304),
             batch 12 x 5 micro-batches (one GPU's share of config/train_small.py on 8 GPUs),
             AdamW lr 6e-4, beta2 0.95, 300 steps. Ours: config/train_small.py (no averaging).
             No meta.pkl is written, so nanoGPT takes its default vocab of 50304, as ours does.
--device=cpu runs both in float32 without torch.compile; --device=cuda with bfloat16 autocast and
torch.compile.

How ms/iter is read from the logs (--log_interval, the same for both):
  nanoGPT prints, every log_interval iterations, the time of ONE iteration (`iter N: ..., time
      Yms`), measured from the end of the previous one, so the iterations that start with an
      evaluation (N a multiple of eval_interval) include it: those are dropped.
  ours prints the MEAN over the iterations since its last line; its timer leaves evaluations and
      checkpoint writes out.
  At the default log_interval=1 both are single iterations. The figure of a run is the median
  over its log lines after the first skip_iters iterations (start-up, allocator, compilation).
Wall time is the whole process: start-up, evaluations, checkpoints. The final val loss is the
last `step N: train loss X, val loss Y` line of each log (both trainers print that line).
Known differences that stay: nanoGPT takes max_iters + 1 steps (iterations 0..max_iters), ours
max_iters; their batch samplers and eval batches differ (nanoGPT: the global RNG; ours: pure
functions of seed and step); so the loss curves agree closely but not exactly.

Output: per-round logs and run folders under out_dir, a markdown table of the rounds with the
median ratio, and one JSON line to --bench_out if given (machine, nanoGPT commit, every round).
"""

import dataclasses
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.bench_common import machine_info
from model import GPT, GPTConfig, device_peak_flops
from wagpt.configurator import main
from wagpt.dataloader import open_dataset
from wagpt.errors import ConfigError, UserError
from wagpt.report import append_jsonl, markdown_table

REPO = Path(__file__).resolve().parents[1]

NANOGPT_URL = "https://github.com/karpathy/nanoGPT"

# The settings both trainers get as --key=value. Values are written with repr(), so each must
# have the type of nanoGPT's default for that key (its configurator asserts it): 1.0, not 1.
PRESETS = {
    "baby": {
        "shared": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                       gradient_accumulation_steps=1, dropout=0.0, bias=False,
                       learning_rate=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
                       max_iters=2000, warmup_iters=100, lr_decay_iters=2000, min_lr=1e-4,
                       eval_interval=250, eval_iters=100),
        "ours_config": None,          # train.py's defaults are this config
        "vocab_size": None,           # the dataset's, from meta.json (nanoGPT: from meta.pkl)
    },
    "gpt2_124m": {
        "shared": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=12,
                       gradient_accumulation_steps=5, dropout=0.0, bias=False,
                       learning_rate=6e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
                       max_iters=300, warmup_iters=100, lr_decay_iters=300, min_lr=6e-5,
                       eval_interval=300, eval_iters=20),
        "ours_config": "config/train_small.py",
        "vocab_size": 50304,          # GPT-2's 50257 padded; nanoGPT's default without meta.pkl
    },
}
# per device: what nanoGPT's README runs there (and ours the same)
SYSTEM = {"cpu": dict(compile=False, dtype="float32"),
          "cuda": dict(compile=True, dtype="bfloat16")}


@dataclass
class VsNanoGPTConfig:
    nanogpt_dir: str | None = None  # a checkout of github.com/karpathy/nanoGPT (required; never
                                   # written to)
    out_dir: str = "out/vs_nanogpt"  # the runs, their logs and nanoGPT's working directory
    rounds: int = 3                # rounds of (nanoGPT, ours), taking turns at going first
    preset: str = "baby"           # 'baby' (nanoGPT's baby Shakespeare char config) | 'gpt2_124m'
    device: str = "cpu"            # 'cpu' (float32, no compile) | 'cuda' (bfloat16, compile)
    dataset: str = "shakespeare_char"  # a prepared folder under data/ ...
    data_dir: str | None = None    # ... or an explicit path
    max_iters: int | None = None   # None: the preset's; else also its lr_decay_iters
    log_interval: int = 1          # both trainers print every this many iterations
    skip_iters: int = 100          # iterations not timed at the start of each run
    averaging: str | None = None   # ours: --averaging=... (None: the preset's; '' for none)
    averaging_also: str | None = None  # also run ours with this --averaging in every round
                                   # (e.g. 'ema,bema,lawa'), timed beside the two others
    threads: int | None = None     # OMP_NUM_THREADS of both trainers (None: torch's default)
    bench_out: str | None = None   # append the result as a JSON line to this file

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is unknown; use one of {sorted(PRESETS)}")
        if self.device.split(":")[0] not in SYSTEM:
            raise ValueError(f"device={self.device!r}: use 'cpu' or 'cuda' (or 'cuda:N')")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"threads={self.threads} must be > 0 or None")
        for key in ("rounds", "log_interval"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0")
        if self.max_iters is not None and self.max_iters <= 0:
            raise ValueError(f"max_iters={self.max_iters} must be > 0 or None")
        shared = self.shared()
        if shared["max_iters"] <= shared["warmup_iters"]:
            raise ValueError(f"max_iters={shared['max_iters']} must be > the preset's "
                             f"warmup_iters={shared['warmup_iters']}")
        if not 0 <= self.skip_iters < shared["max_iters"]:
            raise ValueError(f"skip_iters={self.skip_iters} must be in [0, max_iters="
                             f"{shared['max_iters']}): no iteration would be timed")
        if "=" in str(Path(self.out_dir).resolve()):
            raise ValueError(f"out_dir={self.out_dir!r}: nanoGPT's configurator cannot take a "
                             f"value containing '='; choose another folder")
        if self.nanogpt_dir is None:
            raise ConfigError(f"--nanogpt_dir is required: a checkout of nanoGPT (git clone "
                              f"{NANOGPT_URL}, then --nanogpt_dir=nanoGPT)")
        missing = [f for f in ("train.py", "model.py", "configurator.py")
                   if not (Path(self.nanogpt_dir) / f).is_file()]
        if missing:
            raise ConfigError(f"nanogpt_dir={self.nanogpt_dir} is not a nanoGPT checkout (no "
                              f"{', '.join(missing)}); get one with: git clone {NANOGPT_URL}")

    def shared(self):
        """The --key=value settings both trainers get."""
        shared = dict(PRESETS[self.preset]["shared"])
        if self.max_iters is not None:
            shared.update(max_iters=self.max_iters, lr_decay_iters=self.max_iters)
        return shared


# ---------------------------------------------------------------------------------------------
# the two command lines

def args(settings):
    return [f"--{key}={value!r}" if not isinstance(value, str) else f"--{key}={value}"
            for key, value in settings.items()]


def nanogpt_command(cfg, dataset_name, out_dir):
    """nanoGPT's train.py with the shared settings, to run in prepare_nanogpt_workdir's folder
    (out_dir: an absolute path, or a placeholder to print)."""
    return [sys.executable, str(Path(cfg.nanogpt_dir).resolve() / "train.py"), *args({
        "dataset": dataset_name, **cfg.shared(), "device": cfg.device,
        **SYSTEM[cfg.device.split(":")[0]], "out_dir": str(out_dir),
        "log_interval": cfg.log_interval, "wandb_log": False, "always_save_checkpoint": False})]


def ours_command(cfg, out_dir, averaging=None):
    """Our train.py with the same settings, to run from the repository root (out_dir: as in
    nanogpt_command); `averaging` replaces cfg.averaging."""
    preset = PRESETS[cfg.preset]
    data = {"data_dir": str(Path(cfg.data_dir).resolve())} if cfg.data_dir else \
        {"dataset": cfg.dataset}
    extra = {}
    if preset["vocab_size"] is not None:
        extra["vocab_size"] = preset["vocab_size"]
    averaging = cfg.averaging if averaging is None else averaging
    if averaging is not None:
        extra["averaging"] = averaging
    return [sys.executable, str(REPO / "train.py"),
            *([preset["ours_config"]] if preset["ours_config"] else []), *args({
                **data, **cfg.shared(), "device": cfg.device, **SYSTEM[cfg.device.split(":")[0]],
                "out_dir": str(out_dir), "log_interval": cfg.log_interval, **extra})]


def prepare_nanogpt_workdir(cfg, workdir):
    """nanoGPT's working directory: configurator.py (its train.py execs it from the working
    directory), data/<name>/{train,val}.bin as links to our prepared files, and data/<name>/
    meta.pkl from our meta.json (vocab_size; stoi/itos for a char-level dataset), unless the
    preset fixes the vocab size (then nanoGPT takes its default, 50304). Returns <name>."""
    data = open_dataset(cfg.dataset, cfg.data_dir)   # checks the files, names the fix
    name = data.dir.resolve().name
    target = Path(workdir) / "data" / name
    target.mkdir(parents=True, exist_ok=True)
    links = {"configurator.py": Path(cfg.nanogpt_dir) / "configurator.py",
             f"data/{name}/train.bin": data.dir / "train.bin",
             f"data/{name}/val.bin": data.dir / "val.bin"}
    for link, source in links.items():
        path = Path(workdir) / link
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(source.resolve())
    meta_path = target / "meta.pkl"
    if meta_path.exists():
        meta_path.unlink()
    if PRESETS[cfg.preset]["vocab_size"] is None:
        meta = {"vocab_size": data.vocab_size}
        chars = data.meta.get("chars")
        if chars:
            meta.update(stoi={ch: i for i, ch in enumerate(chars)},
                        itos={i: ch for i, ch in enumerate(chars)})
        with open(meta_path, "wb") as f:
            pickle.dump(meta, f)
    return name


def nanogpt_commit(nanogpt_dir):
    """The checked-out commit of the nanoGPT folder, or None if it is not a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(nanogpt_dir), "rev-parse", "--show-toplevel",
                              "HEAD"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    top, commit = out.stdout.split()
    # a copy of nanoGPT's files inside another checkout (this one) is no nanoGPT checkout
    return commit if Path(top).resolve() == Path(nanogpt_dir).resolve() else None


# ---------------------------------------------------------------------------------------------
# reading the logs

NANOGPT_ITER = re.compile(r"^iter (\d+): loss \S+, time ([\d.]+)ms")
OURS_ITER = re.compile(r"^iter (\d+): loss \S+, lr \S+, ([\d.]+) ms/iter")
EVAL_LINE = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


def parse_log(text, trainer, eval_interval, log_interval, skip_iters):
    """{"times": [(iter, ms), ...] of the log lines that are timed, "evals": [(step, val loss)]}.

    nanoGPT's `iter N` line is the time of iteration N (0-based), which includes the evaluation
    when N is a multiple of eval_interval: dropped. Ours' `iter N` line is the mean over the
    steps since its last line (steps N - log_interval .. N - 1, 0-based), evaluations excluded.
    Lines covering any step before skip_iters are dropped."""
    pattern = NANOGPT_ITER if trainer == "nanogpt" else OURS_ITER
    times, evals = [], []
    for line in text.splitlines():
        if match := pattern.match(line):
            it, ms = int(match.group(1)), float(match.group(2))
            first = it if trainer == "nanogpt" else it - log_interval
            if first < skip_iters or (trainer == "nanogpt" and it % eval_interval == 0):
                continue
            times.append((it, ms))
        elif match := EVAL_LINE.match(line):
            evals.append((int(match.group(1)), float(match.group(3))))
    return {"times": times, "evals": evals}


def run_trainer(trainer, command, cwd, log_path, cfg):
    """Run one trainer to its end, its output to log_path: {ms_per_iter, wall_s, val_loss, ...}."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cfg.threads is not None:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                              env=env).returncode
    wall = time.perf_counter() - start
    text = Path(log_path).read_text()
    if code != 0:
        last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
        raise UserError(f"{trainer}: train.py exited with status {code}; its log is {log_path} "
                        f"(last line: {last.strip()})")
    shared = cfg.shared()
    parsed = parse_log(text, trainer, shared["eval_interval"], cfg.log_interval, cfg.skip_iters)
    if not parsed["times"]:
        raise UserError(f"no timed iterations in {log_path}: check its `iter N:` lines")
    step, val = parsed["evals"][-1] if parsed["evals"] else (None, None)
    return {"ms_per_iter": statistics.median(ms for _, ms in parsed["times"]),
            "timed_lines": len(parsed["times"]), "wall_s": wall, "val_step": step,
            "val_loss": val}


# ---------------------------------------------------------------------------------------------
# the rounds

def table(rows):
    def num(fmt):
        return lambda value: None if value is None else format(value, fmt)
    trainers = [t for t in ("nanogpt", "ours", "ours_averaging") if t in rows[0]]
    name = {"nanogpt": "nanoGPT", "ours": "ours", "ours_averaging": "ours + averaging"}
    columns = [("round", "round"), ("first", "first")]
    for t in trainers:
        columns.append((f"{name[t]} ms/iter", lambda r, t=t: num(".1f")(r[t]["ms_per_iter"])))
    for t in trainers:
        if "mfu" in rows[0][t]:
            columns.append((f"{name[t]} MFU", lambda r, t=t: num(".1%")(r[t]["mfu"])))
    columns.append(("ours / nanoGPT", lambda r: num(".2f")(r["ratio"])))
    if "ours_averaging" in trainers:
        columns.append(("averaging's share of a step",
                        lambda r: num(".2%")(r["ours_averaging"]["ms_per_iter"] /
                                             r["ours"]["ms_per_iter"] - 1)))
    for t in trainers:
        columns.append((f"{name[t]} wall", lambda r, t=t: f"{r[t]['wall_s']:.0f} s"))
    for t in trainers:
        columns.append((f"{name[t]} val loss", lambda r, t=t: num(".4f")(r[t]["val_loss"])))
    return markdown_table(rows, columns)


def mfu(cfg, ms_per_iter):
    """Model FLOPs utilisation of one iteration of the shared config at ms_per_iter, against
    the device's dense bf16 peak (model.py's estimate, as train.py prints it), or None on a CPU
    or an unknown GPU."""
    shared = cfg.shared()
    peak = device_peak_flops(torch.device(cfg.device)) if cfg.device.startswith("cuda") else None
    if peak is None:
        return None
    vocab = PRESETS[cfg.preset]["vocab_size"] or open_dataset(cfg.dataset, cfg.data_dir).vocab_size
    with torch.device("meta"):
        model = GPT(GPTConfig(**{k: shared[k] for k in ("n_layer", "n_head", "n_embd",
                                                        "block_size", "bias")},
                              vocab_size=vocab))
    tokens = shared["batch_size"] * shared["gradient_accumulation_steps"] * shared["block_size"]
    return model.estimate_mfu(tokens * 1000 / ms_per_iter, peak)


def bench(cfg):
    out = Path(cfg.out_dir)
    workdir = out / "nanogpt_workdir"
    dataset_name = prepare_nanogpt_workdir(cfg, workdir)
    info = {**machine_info(cfg.device),
            "nanogpt_commit": nanogpt_commit(cfg.nanogpt_dir)}
    if cfg.threads is not None:   # what the trainers ran with, not this process
        info["threads"] = cfg.threads
    print(f"{info['device']}, {info['cpu']}, torch {info['torch']}, {info['threads']} threads; "
          f"nanoGPT {info['nanogpt_commit'] or '(not a git checkout)'}")
    print("nanoGPT: " + " ".join(nanogpt_command(cfg, dataset_name, "ROUND_DIR/nanogpt")[1:]))
    print("ours:    " + " ".join(ours_command(cfg, "ROUND_DIR/ours")[1:]))
    if cfg.averaging_also is not None:
        print("ours + averaging: " + " ".join(
            ours_command(cfg, "ROUND_DIR/ours_averaging", cfg.averaging_also)[1:]))
    rows = []
    for n in range(1, cfg.rounds + 1):
        round_dir = out / f"round_{n}"
        if round_dir.exists():   # our train.py will not overwrite another run's out_dir
            shutil.rmtree(round_dir)
        round_dir.mkdir(parents=True)
        absolute = round_dir.resolve()
        runs = {"nanogpt": (nanogpt_command(cfg, dataset_name, absolute / "nanogpt"), workdir),
                "ours": (ours_command(cfg, absolute / "ours"), REPO)}
        if cfg.averaging_also is not None:
            runs["ours_averaging"] = (ours_command(cfg, absolute / "ours_averaging",
                                                   cfg.averaging_also), REPO)
        order = list(runs) if n % 2 else list(reversed(runs))
        row = {"round": n, "first": "nanoGPT" if order[0] == "nanogpt" else "ours"}
        for trainer in order:
            command, cwd = runs[trainer]
            row[trainer] = run_trainer(trainer, command, cwd, round_dir / f"{trainer}.log", cfg)
            utilisation = mfu(cfg, row[trainer]["ms_per_iter"])
            if utilisation is not None:
                row[trainer]["mfu"] = utilisation
            print(f"round {n} {trainer}: {row[trainer]['ms_per_iter']:.2f} ms/iter, "
                  f"{row[trainer]['wall_s']:.0f} s, val loss {row[trainer]['val_loss']}")
        row["ratio"] = row["ours"]["ms_per_iter"] / row["nanogpt"]["ms_per_iter"]
        rows.append(row)
    median_ratio = statistics.median(r["ratio"] for r in rows)
    print()
    print(table(rows))
    print(f"\nmedian ours / nanoGPT ms/iter: {median_ratio:.2f} over {len(rows)} rounds "
          f"(below 1: ours is faster)")
    if cfg.averaging_also is not None:
        share = statistics.median(r["ours_averaging"]["ms_per_iter"] / r["ours"]["ms_per_iter"]
                                  for r in rows) - 1
        print(f"median share of a step that --averaging={cfg.averaging_also} adds: "
              f"{100 * share:.2f}%")
    result = {**info, "config": dataclasses.asdict(cfg), "shared": cfg.shared(),
              "rounds": rows, "median_ratio": median_ratio}
    if cfg.bench_out:
        append_jsonl(cfg.bench_out, result)
    return result


if __name__ == "__main__":
    main(VsNanoGPTConfig, bench, __doc__)
