"""
Time one averaging update (EMA, BEMA) over all of a model's parameters, three ways side by side:

  flat     this project's way: the weights are ONE contiguous float32 buffer, and one call of
           averaging.ema_update_ / averaging.bema_step_ updates all of them (on CUDA that call
           may dispatch to a fused Triton kernel; then a second row forces the torch backend)
  foreach  one tensor per parameter, torch._foreach_* ops over the lists (timm's ModelEmaV3,
           torch.optim.swa_utils.AveragedModel with a multi-avg fn)
  loop     one tensor per parameter, a Python loop of mul_/add_/copy_ (TRL's BEMACallback)

    python -m benchmarks.bench_averaging              # the default Shakespeare model, CPU
    python -m benchmarks.bench_averaging --model_size=gpt2 --vocab_size=50304 --block_size=1024 \
        --step_bench=False --bench_iters=5                # GPT-2 124M's shapes on a CPU
    python -m benchmarks.bench_averaging config/train_small.py --device=cuda \
        --dataset=shakespeare_char --gradient_accumulation_steps=5 \
        --bench_out=averaging.jsonl                      # GPT-2 124M on one GPU

The parameter shapes are those of the GPT that the (train.py) config describes, the tied
embedding/head counted once; the tensors hold random values. Every approach does the same update
on the same values: before timing, one update of each is compared with the others and the run
stops if they differ. The training step of that same model is timed with bench.py, so the
update's cost is also reported as a share of a step (any prepared dataset will do for that: the
step's time does not depend on which tokens it sees, so the GPU line above uses the small
character-level corpus with GPT-2's vocab_size and context; gradient_accumulation_steps=5 is what
each of train_small.py's 8 GPUs does per step).

Bytes: GB/s uses the cost model of docs/averaging.md, the least traffic an update can
have: EMA reads θ and e and writes e, 12 B/param; BEMA reads θ, θ₀, e and writes e and the
output, 20 B/param. All approaches of a method are divided by the same ideal bytes, so their GB/s
compare like their times; "% of copy BW" is that over a large copy measured in the same run
(on a CPU it can pass 100%: the copy's stores also read their destination, which its 8 B do not
count). The `est. B` column is what each approach moves by our count, temporaries included.
Results go to stdout (a markdown table last), and as one JSON line to --bench_out if given.
"""

import dataclasses
import math
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

import averaging
from benchmarks.bench_common import machine_info
from model import GPT, GPTConfig
from wagpt import kernels
from wagpt.configurator import main, parse_choices
from wagpt.dataloader import open_dataset
from wagpt.errors import ConfigError
from wagpt.report import append_jsonl, markdown_table
from wagpt.runtime import init_runtime
from wagpt.throughput import BenchConfig, measure_throughput
from wagpt.trainer import model_args_from_config

REPO = Path(__file__).resolve().parents[1]

METHODS = ("ema", "bema")
APPROACHES = ("flat", "foreach", "loop")
IDEAL_BYTES = {"ema": 12, "bema": 20}  # per parameter, fp32: the spec's cost model
# What each approach moves per parameter by our count: every op reads its inputs and writes its
# output once; 4 B per float32 element.
#   flat/torch EMA: lerp_ (r θ, r e, w e) = 12. BEMA: that + sub(θ, θ₀, out=out) 12, mul_ 8,
#     add_(e) 12 = 44. The fused kernel: 12 and 20, the ideal.
#   foreach EMA: lerp_ 12. BEMA: lerp_ 12, d = θ − θ₀ 12, d *= α 8, d += e 12, out ← d 8 = 52.
#   loop EMA: mul_ 8, add_ 12 = 20. BEMA: that + θ − θ₀ 12, α·(…) 8, e + (…) 12, copy_ 8 = 60.
EST_BYTES = {("ema", "flat/torch"): 12, ("bema", "flat/torch"): 44,
             ("ema", "flat/triton"): 12, ("bema", "flat/triton"): 20,
             ("ema", "foreach"): 12, ("bema", "foreach"): 52,
             ("ema", "loop"): 20, ("bema", "loop"): 60}
# Realistic weights: EMA decay 0.999; BEMA's schedule at t = 1000 with the paper's defaults.
EMA_BETA = 1 - 0.999
BEMA_BETA = averaging.bema_beta(1000, ema_power=0.5, lag=10, multiplier=1.0)
BEMA_ALPHA = averaging.bema_alpha(1000, bias_power=0.2, lag=10, multiplier=1.0)


@dataclass
class AveragingBenchConfig(BenchConfig):
    # The model whose parameters are averaged (and whose training step is timed) is set by the
    # train.py keys: model_size or n_layer/n_head/n_embd, vocab_size, block_size, bias.
    out_dir: str = "out/bench_averaging"  # never written to
    methods: str = "ema,bema"      # comma-separated, from: ema, bema
    approaches: str = "flat,foreach,loop"  # comma-separated, from: flat, foreach, loop
    bench_warmup: int = 5          # untimed updates per approach before timing
    bench_iters: int = 50          # updates per timed block
    bench_repeats: int = 5         # timed blocks per approach, interleaved; the median is reported
    rotate_mib: int = 256          # rotate among enough buffer sets to touch this much per pass
    copy_mib: int | None = None    # size of each buffer of the copy-bandwidth test (None: 1024
                                   # on CUDA, 256 on CPU)
    step_bench: bool = True        # also time a training step of the model (needs its dataset)
    step_warmup: int = 5           # untimed training steps (compile, allocator, autotuning)
    step_iters: int = 20           # training steps per timed block (bench_repeats blocks)

    def __post_init__(self):
        super().__post_init__()
        parse_choices("methods", self.methods, METHODS)
        parse_choices("approaches", self.approaches, APPROACHES)
        if self.rotate_mib < 0:
            raise ValueError(f"rotate_mib={self.rotate_mib} must be >= 0 (0: no rotation)")
        if self.copy_mib is not None and self.copy_mib <= 0:
            raise ValueError(f"copy_mib={self.copy_mib} must be > 0, or None for the default")
        if self.step_iters <= 0:
            raise ValueError(f"step_iters={self.step_iters} must be > 0")
        if self.step_warmup < 0:
            raise ValueError(f"step_warmup={self.step_warmup} must be >= 0")


# ---------------------------------------------------------------------------------------------
# the three ways of doing one update; each takes one buffer set (see make_sets)

def flat_ema_(s, beta):
    averaging.ema_update_(s["ema"], s["theta"], beta)


def flat_bema_(s, beta, alpha):
    averaging.bema_step_(s["ema"], s["theta"], s["theta0"], beta, alpha, s["out"])


def foreach_ema_(s, beta):
    torch._foreach_lerp_(s["ema"], s["theta"], beta)


def foreach_bema_(s, beta, alpha):
    torch._foreach_lerp_(s["ema"], s["theta"], beta)
    d = torch._foreach_sub(s["theta"], s["theta0"])
    torch._foreach_mul_(d, alpha)
    torch._foreach_add_(d, s["ema"])
    torch._foreach_copy_(s["out"], d)


def loop_ema_(s, beta):
    for e, t in zip(s["ema"], s["theta"]):
        e.mul_(1 - beta).add_(t, alpha=beta)


def loop_bema_(s, beta, alpha):
    for e, t, t0, o in zip(s["ema"], s["theta"], s["theta0"], s["out"]):
        e.mul_(1 - beta).add_(t, alpha=beta)
        o.copy_(e + alpha * (t - t0))


UPDATES = {("ema", "flat"): flat_ema_, ("bema", "flat"): flat_bema_,
           ("ema", "foreach"): foreach_ema_, ("bema", "foreach"): foreach_bema_,
           ("ema", "loop"): loop_ema_, ("bema", "loop"): loop_bema_}


def update(method, approach, s):
    """One update of `method` on buffer set `s` the `approach` way, with realistic β, α."""
    fn = UPDATES[(method, approach)]
    if method == "ema":
        fn(s, EMA_BETA)
    else:
        fn(s, BEMA_BETA, BEMA_ALPHA)


def make_sets(shapes, approaches, n_sets, device, seed=0):
    """n_sets buffer sets per approach, {approach: [{"ema","theta","theta0","out": ...}, ...]}.

    Set i holds the same random values in every approach: per-parameter tensors (separately
    allocated, as a model's parameters are) for foreach and loop, their concatenation for flat.
    Random normal, never zeros: zeros can hide unwritten outputs and run faster than real data.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    sets = {a: [] for a in approaches}
    for _ in range(n_sets):
        per_param = {k: [torch.randn(sh, generator=g, device=device) for sh in shapes]
                     for k in ("ema", "theta", "theta0", "out")}
        for a in approaches:
            if a == "flat":
                sets[a].append({k: torch.cat([t.reshape(-1) for t in ts])
                                for k, ts in per_param.items()})
            else:
                sets[a].append({k: [t.clone() for t in ts] for k, ts in per_param.items()})
    return sets


def as_flat(s):
    """A buffer set's ema and out as flat tensors, whatever the approach."""
    return {k: v if torch.is_tensor(v) else torch.cat([t.reshape(-1) for t in v])
            for k, v in s.items() if k in ("ema", "out")}


def check_same_result(sets, methods, context=nullcontext):
    """Apply one update of each method, every approach on its copy of set 0, and raise unless all
    approaches agree (ema for EMA; ema and out for BEMA, whose out is poisoned with NaN first so
    that an unwritten element fails). Leaves set 0 one update further on, which the timing
    does not mind."""
    for method in methods:
        results = {}
        for a, a_sets in sets.items():
            s = a_sets[0]
            if method == "bema":
                for o in [s["out"]] if torch.is_tensor(s["out"]) else s["out"]:
                    o.fill_(float("nan"))
            with context():
                update(method, a, s)
            results[a] = as_flat(s)
            if method == "ema":
                del results[a]["out"]
        ref_name, ref = next(iter(results.items()))
        for a, got in results.items():
            for k in got:
                try:
                    torch.testing.assert_close(got[k], ref[k])
                except AssertionError as e:
                    raise AssertionError(f"{method}: approach {a!r} computes a different {k} "
                                         f"than {ref_name!r}; the timings would not compare "
                                         f"equal work:\n{e}") from None


# ---------------------------------------------------------------------------------------------
# timing

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(fn, iters, device):
    """ms per call of fn(i), i = 0..iters-1, over one block: CUDA events on a GPU (the host only
    enqueues), the host clock on a CPU (where the work is done when the call returns)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        for i in range(iters):
            fn(i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for i in range(iters):
        fn(i)
    return 1000 * (time.perf_counter() - t0) / iters


def memory_bandwidth(device, mib, warmup, iters, repeats):
    """Measured memory bandwidth in GB/s (median block) of two large float32 streams:
    copy, dst.copy_(src), bytes read + written (8 B/element): the ceiling for a memory-bound
      update;
    add, dst.add_(src), read 2 + write 1 (12 B/element): the access pattern of the EMA lerp. On a
      CPU it can beat copy, whose stores also read dst into the cache first (write-allocate),
      traffic the 8 B do not count; on a GPU the two should agree."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.randn(n, device=device)  # touched once, so first-touch faults stay out
    result = {}
    for name, fn, nbytes in (("copy", lambda i: dst.copy_(src), 8),
                             ("add", lambda i: dst.add_(src), 12)):
        for _ in range(warmup):
            fn(0)
        ms = statistics.median(time_block(fn, iters, device) for _ in range(repeats))
        result[name] = nbytes * n / (ms / 1000) / 1e9
    del src, dst
    return result


def model_shapes(cfg):
    """Parameter shapes of the config's GPT (tied weight once), built on the meta device: no
    memory, no init cost."""
    data = (open_dataset(cfg.dataset, cfg.data_dir) if cfg.vocab_size is None or cfg.step_bench
            else None)
    model_args = model_args_from_config(cfg, data)
    with torch.device("meta"):
        model = GPT(GPTConfig(**model_args))
    return [tuple(p.shape) for p in model.parameters()], model_args


def _backend_rows(device, approaches):
    """(approach, row label, backend, context factory) for each timed row. flat runs under
    kernels.backend("auto"); where that picks the Triton kernel (CUDA), a second flat row forces
    the torch code, so the kernel's gain is measured in the same run."""
    rows = []
    for a in approaches:
        if a != "flat":
            rows.append((a, a, "torch", nullcontext))
        else:
            with kernels.backend("auto"):
                auto = "triton" if kernels.use_triton(torch.empty(1, device=device)) else "torch"
            if auto == "torch":
                rows.append((a, "flat", "torch", lambda: kernels.backend("auto")))
            else:
                rows.append((a, "flat (triton)", "triton", lambda: kernels.backend("auto")))
                rows.append((a, "flat (torch)", "torch", lambda: kernels.backend("torch")))
    return rows


def run(cfg):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("bench_averaging.py times one device; run it without torchrun")
    methods = parse_choices("methods", cfg.methods, METHODS)
    approaches = parse_choices("approaches", cfg.approaches, APPROACHES)
    runtime = init_runtime(cfg.device, cfg.dtype)
    device = runtime.device
    shapes, model_args = model_shapes(cfg)
    n = sum(math.prod(sh) for sh in shapes)

    # Between two averaging updates, training streams far more than any cache through the
    # device, so an update starts from main memory. Repeating the update on one set that fits in
    # the cache (the CPU's L3 of tens of MiB; a GPU's L2 of 50 MiB holds ~3M params of BEMA state)
    # would time the cache instead: rotate among enough sets to touch rotate_mib per pass.
    set_bytes = 16 * n  # ema, theta, theta0, out in float32
    n_sets = max(1, min(64, math.ceil(cfg.rotate_mib * 2**20 / set_bytes)))
    sets = make_sets(shapes, approaches, n_sets, device)
    rows = _backend_rows(device, approaches)
    for context in [ctx for a, _, _, ctx in rows if a == "flat"] or [nullcontext]:
        check_same_result(sets, methods, context)  # each backend of flat against the others

    copy_mib = cfg.copy_mib or (1024 if device.type == "cuda" else 256)
    bandwidth = memory_bandwidth(device, copy_mib, max(1, cfg.bench_warmup), 10,
                                 cfg.bench_repeats)
    copy_gbs = bandwidth["copy"]

    timed = [(m, a, label, backend, ctx) for m in methods for a, label, backend, ctx in rows]
    for m, a, _, _, ctx in timed:
        with ctx():
            for i in range(cfg.bench_warmup):
                update(m, a, sets[a][i % n_sets])
    synchronize(device)
    blocks = {(m, label): [] for m, _, label, _, _ in timed}
    for _ in range(cfg.bench_repeats):  # interleaved, so slow drift hits every row alike
        for m, a, label, _, ctx in timed:
            with ctx():
                blocks[(m, label)].append(time_block(
                    lambda i: update(m, a, sets[a][i % n_sets]), cfg.bench_iters, device))
    del sets
    if device.type == "cuda":
        torch.cuda.empty_cache()

    step = None
    if cfg.step_bench:
        step_cfg = dataclasses.replace(cfg, bench_warmup=cfg.step_warmup,
                                       bench_iters=cfg.step_iters, bench_out=None)
        r = measure_throughput(step_cfg)
        precision = "bfloat16 autocast" if runtime.autocast_dtype else "float32"
        step = {"ms": r["ms_per_iter"], "ms_blocks": r["ms_per_iter_blocks"],
                "tokens_per_iter": r["tokens_per_iter"],
                "what": f"train.train_step of this model: {cfg.gradient_accumulation_steps} x "
                        f"{cfg.batch_size} x {model_args['block_size']} tokens, {precision}, "
                        f"compile {cfg.compile}, AdamW, grad clip {cfg.grad_clip}"}

    result_rows = []
    for m, a, label, backend, _ in timed:
        ms = statistics.median(blocks[(m, label)])
        est = f"flat/{backend}" if a == "flat" else a
        gbs = n * IDEAL_BYTES[m] / (ms / 1000) / 1e9
        result_rows.append({
            "method": m, "approach": a, "row": label, "backend": backend, "ms": ms,
            "ms_blocks": blocks[(m, label)],
            "ideal_bytes_per_param": IDEAL_BYTES[m], "est_bytes_per_param": EST_BYTES[(m, est)],
            "gb_per_s": gbs, "frac_of_copy_bw": gbs / copy_gbs,
            "frac_of_step": ms / step["ms"] if step else None})
    for r in result_rows:  # speed-up of each flat row over the other approaches of its method
        for other in ("loop", "foreach"):
            ref = [x for x in result_rows if x["method"] == r["method"] and x["approach"] == other]
            r[f"flat_speedup_vs_{other}"] = (ref[0]["ms"] / r["ms"]
                                             if ref and r["approach"] == "flat" else None)

    result = {
        "bench": "averaging_update", **machine_info(device),
        "averaging_backend": kernels.get_backend(), "have_triton": kernels.HAVE_TRITON,
        "n_params": n, "n_tensors": len(shapes), "model_args": model_args,
        "buffer_sets": n_sets, "mib_per_set": set_bytes / 2**20,
        "copy_gb_per_s": copy_gbs, "add_gb_per_s": bandwidth["add"], "copy_mib": copy_mib,
        "ema_beta": EMA_BETA, "bema_beta": BEMA_BETA, "bema_alpha": BEMA_ALPHA,
        "step": step, "rows": result_rows, "config": dataclasses.asdict(cfg),
    }
    print(report(result))
    if cfg.bench_out:
        append_jsonl(cfg.bench_out, result)
    return result


def report(res):
    """Header lines and the markdown table."""
    lines = [f"{res['device']} ({res['cpu']}), torch {res['torch']}, {res['threads']} threads, "
             f"{res['date']}",
             f"N = {res['n_params']:,} params in {res['n_tensors']} tensors "
             f"({res['model_args']}); {res['buffer_sets']} rotating buffer sets of "
             f"{res['mib_per_set']:.1f} MiB per approach",
             f"memory bandwidth: copy {res['copy_gb_per_s']:.1f} GB/s (read + write of a "
             f"{res['copy_mib']} MiB float32 copy_), in-place add_ {res['add_gb_per_s']:.1f} GB/s "
             f"(read 2 + write 1)"]
    if res["step"]:
        lines.append(f"training step: {res['step']['ms']:.2f} ms "
                     f"({res['step']['what']})")
    def f(x, fmt):
        return "—" if x is None else format(x, fmt)
    lines += ["", markdown_table(res["rows"], [
        ("method", "method"), ("approach", "row"), ("ms/update", lambda r: f"{r['ms']:.3f}"),
        ("spread (min–max)", lambda r: f"{min(r['ms_blocks']):.3f}–{max(r['ms_blocks']):.3f}"),
        ("ideal B/param", "ideal_bytes_per_param"), ("est. B/param", "est_bytes_per_param"),
        ("GB/s (ideal B)", lambda r: f"{r['gb_per_s']:.1f}"),
        ("% of copy BW", lambda r: f"{100 * r['frac_of_copy_bw']:.0f}%"),
        ("flat × vs loop", lambda r: f(r["flat_speedup_vs_loop"], ".2f")),
        ("flat × vs foreach", lambda r: f(r["flat_speedup_vs_foreach"], ".2f")),
        ("% of train step", lambda r: f(None if r["frac_of_step"] is None
                                        else 100 * r["frac_of_step"], ".2f"))])]
    return "\n".join(lines)


if __name__ == "__main__":
    main(AveragingBenchConfig, run, __doc__)
