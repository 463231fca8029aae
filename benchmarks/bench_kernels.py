"""
Bandwidth of each averaging kernel of wagpt/kernels/ on one GPU, after checking it against float64.

    python -m benchmarks.bench_kernels                       # on a CUDA machine: check, then time
    python -m benchmarks.bench_kernels --numel=50000000 --tune=False

1. Check: every kernel (ema, bema, dema, ouema, running mean) at sizes that straddle the block,
   θ in float32 and bfloat16, random inputs, against the update written out in float64; outputs
   start as NaN and every buffer has a sentinel tail, so an unwritten element or a store past the
   end fails. The run stops at the first kernel that is off (relative error >= 1e-6).
2. Time: one update over `numel` elements (default: GPT-2 124M's parameter count) with
   triton.testing.do_bench (CUDA events, L2 flushed before each call, median), for the Triton
   kernel and for averaging.py's torch code on the same buffers, next to a device-to-device copy
   of the same size. GB/s counts the least traffic each update can have (every input read once,
   every output written once: EMA 12 B/param with fp32 θ, BEMA 20, DEMA 24, OUEMA 16, mean 12;
   2 B less with bf16 θ), and "% of copy" is that over the copy's read + write bandwidth.
3. Tune (--tune=True): the fused BEMA kernel at other BLOCK / num_warps values than the shipped
   kernels.averaging_triton.BLOCK and NUM_WARPS.

Results go to stdout (a markdown table last), and as one JSON line to --bench_out if given.
CPU tensors run only the check, in Triton's interpreter (TRITON_INTERPRET=1, --device=cpu):
that is how tests/test_bench_kernels.py runs this script's check without a GPU.
"""

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import averaging
from benchmarks.bench_common import machine_info
from wagpt import kernels
from wagpt.configurator import main, parse_choices
from wagpt.report import append_jsonl, markdown_table

REPO = Path(__file__).resolve().parents[1]

# kernel: (state buffers it reads and writes, buffers only written, whether it reads θ₀)
KERNELS = {
    "ema": (("ema",), (), False),
    "bema": (("ema",), ("out",), True),
    "dema": (("e1", "e2"), ("out",), False),
    "ouema": (("ema",), (), True),
    "mean": (("mean",), (), False),
}
SCALARS = {"beta": 0.29, "alpha": 0.63, "a": 2 ** -0.2, "n": 7}
THETA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHOICES = {"kernels": KERNELS, "theta_dtypes": THETA_DTYPES}   # config keys holding a list
TOL = 1e-6
SENTINEL = 12345.0
TAIL = 64


@dataclass
class KernelBenchConfig:
    device: str = "cuda"
    numel: int = 124_373_760          # GPT-2 124M's parameters (vocab 50304, tied head once)
    kernels: str = "ema,bema,dema,ouema,mean"
    theta_dtypes: str = "float32,bfloat16"
    check: bool = True                 # the float64 check before timing
    time: bool = True                  # time (CUDA only)
    tune: bool = True                  # also time BEMA at other BLOCK / num_warps
    warmup_ms: int = 25                # do_bench's warm-up and repetition budgets, in ms
    rep_ms: int = 200
    seed: int = 0
    bench_out: str | None = None       # append the results as one JSON line to this file

    def __post_init__(self):
        for key in CHOICES:
            self.list(key)
        if self.numel < 1:
            raise ValueError(f"numel={self.numel} must be >= 1")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but torch sees no CUDA device; on a CPU use "
                             f"--device=cpu --time=False with TRITON_INTERPRET=1 (check only)")
        if not self.device.startswith("cuda"):
            if self.time:
                raise ValueError("time=True needs a CUDA device; pass --time=False on a CPU")
            if os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError(f"device={self.device!r}: the Triton kernels run CPU tensors "
                                 f"only in the interpreter; set TRITON_INTERPRET=1")

    def list(self, key):
        return parse_choices(key, getattr(self, key), CHOICES[key])


# ------------------------------------------------------------------------- the five updates

def buffers(kernel, n, theta_dtype, device, gen):
    """Random θ, θ₀ and state for `kernel` over n elements; written-only outputs start as NaN.
    Each buffer is a view into n + TAIL elements whose tail holds SENTINEL."""
    state, written, reads_theta0 = KERNELS[kernel]
    names = ("theta",) + (("theta0",) if reads_theta0 else ()) + state + written
    full = {}
    for name in names:
        f = torch.full((n + TAIL,), SENTINEL, device=device)
        if name in written:
            f[:n] = float("nan")
        else:
            f[:n] = torch.randn(n, generator=gen, device=device)
        full[name] = f
    views = {k: f[:n] for k, f in full.items()}
    if theta_dtype != torch.float32:   # θ lives in the model's dtype; no tail to check
        views["theta"] = views["theta"].to(theta_dtype)
    return views, full


def run_update(kernel, b):
    s = SCALARS
    if kernel == "ema":
        averaging.ema_update_(b["ema"], b["theta"], s["beta"])
    elif kernel == "bema":
        averaging.bema_step_(b["ema"], b["theta"], b["theta0"], s["beta"], s["alpha"], b["out"])
    elif kernel == "dema":
        averaging.dema_step_(b["e1"], b["e2"], b["theta"], s["beta"], b["out"])
    elif kernel == "ouema":
        averaging.ouema_update_(b["ema"], b["theta"], b["theta0"], s["a"], s["beta"])
    else:
        averaging.running_mean_update_(b["mean"], b["theta"], s["n"])


def reference(kernel, b):
    """The update in float64, from the formulas (docs/averaging.md), on copies of the inputs."""
    d = {k: v.double() for k, v in b.items()}
    th, s = d["theta"], SCALARS
    if kernel == "ema":
        return {"ema": d["ema"] + s["beta"] * (th - d["ema"])}
    if kernel == "bema":
        e = d["ema"] + s["beta"] * (th - d["ema"])
        return {"ema": e, "out": e + s["alpha"] * (th - d["theta0"])}
    if kernel == "dema":
        e1 = d["e1"] + s["beta"] * (th - d["e1"])
        e2 = d["e2"] + s["beta"] * (e1 - d["e2"])
        return {"e1": e1, "e2": e2, "out": 2 * e1 - e2}
    if kernel == "ouema":
        tilde = (th - s["a"] * d["theta0"]) / (1 - s["a"])
        return {"ema": d["ema"] + s["beta"] * (tilde - d["ema"])}
    return {"mean": d["mean"] + (th - d["mean"]) / s["n"]}


def check(cfg, sizes):
    """Raise unless every Triton kernel matches its float64 reference; returns the worst error."""
    block = kernels.triton_ops().BLOCK
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    worst = 0.0
    for kernel in cfg.list("kernels"):
        for dtype_name in cfg.list("theta_dtypes"):
            for n in sizes(block):
                b, full = buffers(kernel, n, THETA_DTYPES[dtype_name], cfg.device, gen)
                ref = reference(kernel, b)
                with kernels.backend("triton"):
                    run_update(kernel, b)
                for name, want in ref.items():
                    where = f"{kernel} kernel, theta {dtype_name}, n={n}, buffer {name}"
                    got = b[name]
                    if not torch.isfinite(got).all():
                        raise AssertionError(f"{where}: {(~torch.isfinite(got)).sum().item()} "
                                             f"elements not written")
                    if not (full[name][n:] == SENTINEL).all():
                        raise AssertionError(f"{where}: a store went past the end")
                    err = ((got.double() - want).norm() / want.norm()).item()
                    if not err < TOL:
                        raise AssertionError(f"{where}: relative error {err:.3g} >= {TOL}")
                    worst = max(worst, err)
    return worst


def check_sizes(block):
    return (1, 7, block - 1, block + 1, 3 * block + 17, 1_000_003)


# ----------------------------------------------------------------------------------- timing

def ideal_bytes(kernel, theta_dtype):
    state, written, reads_theta0 = KERNELS[kernel]
    f32_reads = len(state) + reads_theta0
    f32_writes = len(state) + len(written)
    return torch.tensor([], dtype=theta_dtype).element_size() + 4 * (f32_reads + f32_writes)


def time_ms(fn, cfg):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms,
                                   return_mode="median")


def copy_gbps(cfg):
    src = torch.randn(cfg.numel, device=cfg.device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), cfg)
    return 8 * cfg.numel / ms / 1e6, ms


def time_kernels(cfg, copy_bw):
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1)
    rows = []
    for kernel in cfg.list("kernels"):
        for dtype_name in cfg.list("theta_dtypes"):
            b, _ = buffers(kernel, cfg.numel, THETA_DTYPES[dtype_name], cfg.device, gen)
            ms = {}
            for backend in ("triton", "torch"):
                with kernels.backend(backend):
                    ms[backend] = time_ms(lambda: run_update(kernel, b), cfg)
            nbytes = ideal_bytes(kernel, THETA_DTYPES[dtype_name]) * cfg.numel
            gbps = nbytes / ms["triton"] / 1e6
            rows.append({"kernel": kernel, "theta": dtype_name,
                         "bytes_per_param": nbytes // cfg.numel,
                         "triton_ms": ms["triton"], "torch_ms": ms["torch"],
                         "triton_gbps": gbps, "pct_of_copy": 100 * gbps / copy_bw,
                         "torch_gbps": nbytes / ms["torch"] / 1e6,
                         "speedup_vs_torch": ms["torch"] / ms["triton"]})
            del b
    return rows


def tune_bema(cfg, copy_bw):
    """The fused BEMA kernel (fp32 θ) at several BLOCK / num_warps; the shipped values first."""
    ops = kernels.triton_ops()
    shipped = (ops.BLOCK, ops.NUM_WARPS)
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 2)
    b, _ = buffers("bema", cfg.numel, torch.float32, cfg.device, gen)
    rows = []
    try:
        for block, warps in [shipped] + [(bl, w) for bl in (512, 1024, 2048, 4096, 8192)
                                         for w in (4, 8, 16) if (bl, w) != shipped]:
            ops.BLOCK, ops.NUM_WARPS = block, warps
            with kernels.backend("triton"):
                ms = time_ms(lambda: run_update("bema", b), cfg)
            gbps = 20 * cfg.numel / ms / 1e6
            rows.append({"block": block, "num_warps": warps, "ms": ms, "gbps": gbps,
                         "pct_of_copy": 100 * gbps / copy_bw, "shipped": (block, warps) == shipped})
    finally:
        ops.BLOCK, ops.NUM_WARPS = shipped
    return rows


def run(cfg):
    result = {**machine_info(cfg.device), "config": asdict(cfg)}
    print(f"{result['device']}, torch {result['torch']}, triton {result['triton']}")
    if cfg.check:
        worst = check(cfg, check_sizes)
        result["check_worst_rel_err"] = worst
        sizes = check_sizes(kernels.triton_ops().BLOCK)
        print(f"check: every kernel matches float64 at sizes {sizes}"
              f", theta {cfg.theta_dtypes}; worst relative error {worst:.2e} (bar {TOL:g})")
    if cfg.time:
        copy_bw, copy_ms = copy_gbps(cfg)
        result.update(copy_gbps=copy_bw, copy_ms=copy_ms, rows=time_kernels(cfg, copy_bw))
        if cfg.tune:
            result["tune"] = tune_bema(cfg, copy_bw)
            print("\nfused BEMA (fp32 θ) by BLOCK / num_warps:\n" + markdown_table(result["tune"], [
                ("BLOCK", lambda r: str(r["block"])), ("num_warps", lambda r: str(r["num_warps"])),
                ("ms", lambda r: f"{r['ms']:.3f}"), ("GB/s", lambda r: f"{r['gbps']:.0f}"),
                ("% of copy", lambda r: f"{r['pct_of_copy']:.1f}"),
                ("shipped", lambda r: "yes" if r["shipped"] else "")]))
        print(f"\ncopy: {copy_bw:.0f} GB/s (read + write, {cfg.numel:,} float32 in "
              f"{copy_ms:.3f} ms)\n" + markdown_table(result["rows"], [
                  ("kernel", lambda r: r["kernel"]), ("θ", lambda r: r["theta"]),
                  ("B/param", lambda r: str(r["bytes_per_param"])),
                  ("triton ms", lambda r: f"{r['triton_ms']:.3f}"),
                  ("GB/s", lambda r: f"{r['triton_gbps']:.0f}"),
                  ("% of copy", lambda r: f"{r['pct_of_copy']:.1f}"),
                  ("torch ms", lambda r: f"{r['torch_ms']:.3f}"),
                  ("torch GB/s", lambda r: f"{r['torch_gbps']:.0f}"),
                  ("triton × vs torch", lambda r: f"{r['speedup_vs_torch']:.2f}")]))
    if cfg.bench_out:
        append_jsonl(cfg.bench_out, result)
    return result


if __name__ == "__main__":
    main(KernelBenchConfig, run, __doc__)
