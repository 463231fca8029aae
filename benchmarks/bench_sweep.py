"""
Offline sweeps that fit and spread: average.py's averaging-only pass over a synthetic trajectory
with GPT-2 124M's shapes, for M settings, with the averagers' state on the device vs in host
memory (--state_device), in one process vs two (torchrun).

    python -m benchmarks.bench_sweep                          # CPU: K = 6 snapshots, M = 8 EMAs
    python -m benchmarks.bench_sweep --device=cuda --snapshots=20 --settings=16
    python -m benchmarks.bench_sweep --n_layer=2 --n_embd=64 --vocab_size=512   # a quick look

The trajectory: random weights of the model shape (GPT-2 124M by default: 12 layers, 12 heads,
768 wide, vocabulary 50304, context 1024, 124.4M parameters), K snapshots written to disk with
checkpoint.save_snapshot (each the last one plus a small random step), and a small random
token dataset to evaluate on. The pass: M EMA settings (one float32 copy of the weights each),
evaluated at the first and last snapshot only, on one batch of 64 tokens, so that what is timed
is reading, averaging and little evaluating. Each configuration runs as its own process (or
torchrun with 2 processes; on the CPU the cores are split between them), and reports
average.py's own time per phase (results.json `timing`: read, average, evaluate; per rank) next
to the wall time of the command. What the issue's targets compare:
  host vs device    time per update (the average phase / (K x M)): host within 2x on a GPU
  2 ranks vs 1      the averaging and evaluation part (the slower rank's average + evaluate):
                    2 ranks at least 1.7x faster than one
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_common import machine_info
from model import GPT, GPTConfig
from wagpt import checkpoint
from wagpt.configurator import main
from wagpt.report import append_jsonl, markdown_table

REPO = Path(__file__).resolve().parents[1]


@dataclass
class BenchSweepConfig:
    out_dir: str = "out/bench_sweep"   # the trajectory, the data and each configuration's output
    snapshots: int = 6             # K snapshots in the trajectory
    settings: int = 8              # M EMA settings in the sweep
    n_layer: int = 12              # model shape: GPT-2 124M ...
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50304
    block_size: int = 1024
    device: str = "cpu"            # 'cpu' | 'cuda'
    state_devices: str = "device,host"  # the placements to time (--state_device of average.py)
    ranks: str = "1,2"             # the process counts to time (torchrun for more than 1)
    state_chunk: int = 2**24       # host state: parameters per chunk through the device
    repeats: int = 1               # timed runs of each configuration (the median is reported)
    bench_out: str | None = None   # append the result as a JSON line

    def __post_init__(self):
        for key in ("snapshots", "settings", "repeats", "state_chunk"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0")


def model_args(cfg):
    return dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                vocab_size=cfg.vocab_size, block_size=cfg.block_size, bias=False, dropout=0.0)


def make_trajectory(cfg):
    """K snapshots of random weights (a random walk from a random init) and a random token
    dataset; kept between runs of the benchmark."""
    out = Path(cfg.out_dir)
    snaps, data = out / "trajectory" / "snapshots", out / "data"
    args = model_args(cfg)
    marker = out / "trajectory" / "model_args.json"
    if marker.exists() and json.loads(marker.read_text()) == args and \
            len(checkpoint.list_snapshots(snaps)) == cfg.snapshots:
        return snaps, data
    for old in checkpoint.list_snapshots(snaps):
        old.unlink()
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    for k in range(cfg.snapshots):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-3)
        checkpoint.save_snapshot(snaps, model, step=100 * k, tokens_seen=0, model_args=args)
    rng = np.random.default_rng(0)
    data.mkdir(parents=True, exist_ok=True)
    vocab = min(cfg.vocab_size, 50257)
    for split, n in (("train", 20_000), ("val", 20_000)):
        rng.integers(0, vocab, n, dtype=np.uint16).tofile(data / f"{split}.bin")
    (data / "meta.json").write_text(json.dumps({"vocab_size": vocab, "dtype": "uint16",
                                                "train_tokens": 20_000, "val_tokens": 20_000,
                                                "tokenizer": "random", "source": "bench_sweep"}))
    marker.write_text(json.dumps(args))
    return snaps, data


def run_pass(cfg, snaps, data, state_device, ranks, name):
    """One average.py pass as its own process(es); (wall seconds, results.json timing)."""
    out = Path(cfg.out_dir) / name
    decays = [round(0.5 + 0.49 * i / max(1, cfg.settings - 1), 4) for i in range(cfg.settings)]
    args = [f"--ckpt_dir={snaps}", f"--out_dir={out}", f"--data_dir={data}", "--methods=ema",
            f"--ema_decay={decays}", f"--eval_every={100 * cfg.snapshots}", "--eval_iters=1",
            "--batch_size=1", "--block_size=64", f"--device={cfg.device}", "--plot=False",
            f"--state_device={state_device}", f"--state_chunk={cfg.state_chunk}",
            "--overwrite=True"]   # the repeats of a configuration
    threads = max(1, (os.cpu_count() or 1) // ranks) if cfg.device == "cpu" else 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "average.py", *args] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={ranks}", "average.py", *args]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return wall, json.loads((out / "results.json").read_text())["timing"]


def bench(cfg):
    snaps, data = make_trajectory(cfg)
    numel = sum(p.numel() for p in GPT(GPTConfig(**model_args(cfg))).parameters())
    rows = []
    for state_device in cfg.state_devices.split(","):
        for ranks in (int(r) for r in cfg.ranks.split(",")):
            runs = sorted((run_pass(cfg, snaps, data, state_device, ranks,
                                    f"{state_device}_{ranks}") for _ in range(cfg.repeats)),
                          key=lambda r: r[0])
            wall, timing = runs[len(runs) // 2]
            slowest = max(timing, key=lambda t: t["average"] + t["evaluate"])
            rows.append({"state_device": state_device, "ranks": ranks, "wall_s": wall,
                         "read_s": slowest["read"], "average_s": slowest["average"],
                         "evaluate_s": slowest["evaluate"],
                         "average_evaluate_s": slowest["average"] + slowest["evaluate"],
                         "ms_per_update": 1000 * max(t["average"] for t in timing) * ranks /
                         (cfg.snapshots * cfg.settings), "timing": timing})
    result = {**machine_info(cfg.device), "parameters": numel, "snapshots": cfg.snapshots,
              "settings": cfg.settings, "rows": rows}

    def find(state_device, ranks):
        return next((r for r in rows if r["state_device"] == state_device and
                     r["ranks"] == ranks), None)
    for r in rows:
        device_row, one_rank = find("device", r["ranks"]), find(r["state_device"], 1)
        r["update_vs_device"] = r["ms_per_update"] / device_row["ms_per_update"] \
            if device_row else None
        r["speedup_vs_1_rank"] = one_rank["average_evaluate_s"] / r["average_evaluate_s"] \
            if one_rank else None
    print(f"{numel / 1e6:.1f}M parameters, K = {cfg.snapshots} snapshots, M = {cfg.settings} "
          f"EMA settings, {result['device']} ({result['cpu']})")
    print(markdown_table(rows, [
        ("state", "state_device"), ("processes", "ranks"),
        ("wall", lambda r: f"{r['wall_s']:.1f} s"), ("read", lambda r: f"{r['read_s']:.1f} s"),
        ("average", lambda r: f"{r['average_s']:.1f} s"),
        ("evaluate", lambda r: f"{r['evaluate_s']:.1f} s"),
        ("per update", lambda r: f"{r['ms_per_update']:.0f} ms"),
        ("update vs device state", lambda r: "" if r["update_vs_device"] is None
         else f"{r['update_vs_device']:.2f}x"),
        ("average + evaluate vs 1 process", lambda r: "" if r["speedup_vs_1_rank"] is None
         else f"{r['speedup_vs_1_rank']:.2f}x faster")]))
    if cfg.bench_out:
        append_jsonl(cfg.bench_out, {**result, "config": dataclasses.asdict(cfg)})
    return result


if __name__ == "__main__":
    main(BenchSweepConfig, bench, __doc__)
