"""
What the integrity checks cost at GPT-2 124M shapes, against what they guard: writing and reading
a snapshot (checkpoint.save_snapshot / read_checkpoint) and a resume checkpoint (weights and
AdamW's two moments).

    python -m benchmarks.bench_integrity                 # GPT-2 124M shapes, files under /tmp
    python -m benchmarks.bench_integrity --dir=out/bench_integrity --repeats=5

Timed, each the median of `repeats`: the checksum of a snapshot's tensors (integrity.checksum,
XXH3-128), the finite check as the readers and train.py do it (integrity.all_finite: one sum
per tensor) and the elementwise check it replaced (torch.isfinite(t).all() per tensor), the
write of the snapshot with its checksum, and its read with and without the verification; the
same checksum over a resume checkpoint's tensors. Random weights of the right shapes: the cost
depends on the bytes, not the values.
"""

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load

from benchmarks.bench_common import machine_info
from model import GPT, GPTConfig
from wagpt import checkpoint, integrity
from wagpt.configurator import main
from wagpt.report import append_jsonl, markdown_table

GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=False,
                 dropout=0.0)


@dataclass
class BenchIntegrityConfig:
    dir: str | None = None         # where the files are written (None: a temporary folder)
    n_layer: int = 12              # the model's shape (GPT-2 124M by default)
    n_embd: int = 768
    n_head: int = 12
    repeats: int = 3               # timed repeats of each measurement; the median is reported
    bench_out: str | None = None   # append the result as a JSON line

    def __post_init__(self):
        if self.repeats <= 0:
            raise ValueError(f"repeats={self.repeats} must be > 0")


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(cfg):
    args = {**GPT2_124M, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head}
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    state = {k: v.detach().to(torch.float32, copy=True)
             for k, v in checkpoint.model_state(model).items()}
    named = sorted(state.items())
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    moments = {f"{k}/exp_avg{s}": torch.randn_like(v) for k, v in state.items()
               for s in ("", "_sq")}
    resume = [*named, *sorted(moments.items())]
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(cfg.dir or scratch)
        path = checkpoint.save_snapshot(folder / "snapshots", model, 0, 0, args)
        seconds = {
            "checksum": timed(lambda: integrity.checksum(named), cfg.repeats),
            "finite": timed(lambda: integrity.all_finite(list(state.values())), cfg.repeats),
            "finite_elementwise": timed(lambda: all(bool(torch.isfinite(t).all())
                                                    for t in state.values()), cfg.repeats),
            "write": timed(lambda: checkpoint.save_snapshot(folder / "snapshots", model, 0, 0,
                                                            args), cfg.repeats),
            "read_verified": timed(lambda: checkpoint.read_checkpoint(path), cfg.repeats),
            "read_unverified": timed(lambda: safetensors_load(path.read_bytes()), cfg.repeats),
            "resume_checksum": timed(lambda: integrity.checksum(resume), cfg.repeats),
        }
    params = sum(t.numel() for t in state.values())
    rows = [
        ("checksum (XXH3-128)", seconds["checksum"], nbytes, seconds["write"]),
        ("finite check, one sum per tensor", seconds["finite"], nbytes, seconds["write"]),
        ("finite check, elementwise (before)", seconds["finite_elementwise"], nbytes,
         seconds["write"]),
        ("snapshot write, checksum included", seconds["write"], nbytes, seconds["write"]),
        ("snapshot read, verified", seconds["read_verified"], nbytes, seconds["write"]),
        ("snapshot read, not verified", seconds["read_unverified"], nbytes, seconds["write"]),
        ("checksum of a resume checkpoint (3 copies)", seconds["resume_checksum"], 3 * nbytes,
         None),
    ]
    table = [{"what": what, "seconds": s, "gb_s": size / s / 1e9,
              "of_write": None if write is None else s / write}
             for what, s, size, write in rows]
    print(f"{params / 1e6:.1f}M parameters, a snapshot of {nbytes / 2**20:.0f} MiB; "
          f"median of {cfg.repeats}")
    print(markdown_table(table, [
        ("what", "what"), ("time", lambda r: f"{1000 * r['seconds']:.0f} ms"),
        ("GB/s", lambda r: f"{r['gb_s']:.1f}"),
        ("of the snapshot write", lambda r: "" if r["of_write"] is None
         else f"{100 * r['of_write']:.0f}%")]))
    result = {**machine_info("cpu"), "parameters": params, "snapshot_bytes": nbytes,
              "seconds": seconds}
    if cfg.bench_out:
        append_jsonl(cfg.bench_out, result)
    return result


if __name__ == "__main__":
    main(BenchIntegrityConfig, bench, __doc__)
