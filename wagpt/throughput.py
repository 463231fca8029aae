"""
Training throughput of a config: the same train_step as train.py on the same batches, after
warm-up, with no eval or checkpoints, so what it measures is what training pays per step
(bench.py is its command; benchmarks/bench_averaging.py times the averaging update against it).
"""

import statistics
import time
from dataclasses import dataclass

import torch

from model import device_peak_flops
from wagpt.dataloader import open_dataset
from wagpt.report import append_jsonl
from wagpt.runtime import init_runtime
from wagpt.trainer import (Checkpointer, TrainConfig, build, load_start, train_batches, train_step,
                           wrap_model)


@dataclass
class BenchConfig(TrainConfig):
    out_dir: str = "out/bench"     # never written to: bench saves nothing
    bench_warmup: int = 10         # steps before timing (allocator, autotuning, compile)
    bench_iters: int = 50          # timed steps
    bench_repeats: int = 3         # timed blocks of bench_iters; the median is reported
    bench_out: str | None = None   # append the result as a JSON line to this file

    def __post_init__(self):
        super().__post_init__()
        for key in ("bench_iters", "bench_repeats"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0")
        if self.bench_warmup < 0:
            raise ValueError(f"bench_warmup={self.bench_warmup} must be >= 0")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(cfg):
    """Time train_step on the config's model (after bench_warmup steps, bench_repeats blocks of
    bench_iters steps, the median block); print and return ms/iter, tokens/s and MFU."""
    with init_runtime(cfg.device, cfg.dtype) as runtime:
        data = open_dataset(cfg.dataset, cfg.data_dir)
        cfg, start = load_start(cfg)
        run = build(cfg, runtime, data)
        Checkpointer(run, cfg, runtime).load(start)
        model = wrap_model(run.model, cfg, runtime)
        batches = train_batches(data, cfg, runtime, start_step=0)
        lr = cfg.learning_rate
        for _ in range(cfg.bench_warmup):
            train_step(model, run.optimizer, batches, cfg, runtime, lr)
        synchronize(runtime.device)
        block_ms = []
        for _ in range(cfg.bench_repeats):
            start_time = time.perf_counter()
            for _ in range(cfg.bench_iters):
                loss = train_step(model, run.optimizer, batches, cfg, runtime, lr)
            loss.item()  # waits for the last step
            synchronize(runtime.device)
            block_ms.append(1000 * (time.perf_counter() - start_time) / cfg.bench_iters)
        ms = statistics.median(block_ms)
        tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
        peak = device_peak_flops(runtime.device, cfg.peak_flops)
        mfu = run.model.estimate_mfu(tokens_per_iter * 1000 / ms, peak)
        result = {
            "device": torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda"
            else "cpu", "world_size": runtime.world_size, "params": run.model.num_params(),
            "tokens_per_iter": tokens_per_iter, "ms_per_iter": ms, "ms_per_iter_blocks": block_ms,
            "tokens_per_s": tokens_per_iter * 1000 / ms, "mfu": mfu,
            "compile": cfg.compile, "torch": torch.__version__, "threads": torch.get_num_threads(),
        }
        if runtime.master:
            mfu_text = "n/a (no peak for this device; pass --peak_flops)" if mfu is None \
                else f"{100 * mfu:.1f}%"
            print(f"{result['device']} x{runtime.world_size}: {ms:.2f} ms/iter "
                  f"(blocks {', '.join(f'{b:.2f}' for b in block_ms)}), "
                  f"{result['tokens_per_s']:,.0f} tokens/s, MFU {mfu_text}")
            if cfg.bench_out:
                append_jsonl(cfg.bench_out, result)
        return result


