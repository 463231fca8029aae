"""
Offline averaging: ONE pass of average.py serving M settings over K snapshots, against M
single-setting passes (how the published tools run a sweep: one method and setting per
invocation, every snapshot re-read each time).

    python -m benchmarks.bench_offline              # M = 12, K = 50, the default model
    python -m benchmarks.bench_offline --ckpt_dir=out/run/snapshots     # an existing trajectory
    python -m benchmarks.bench_offline --n_layer=8 --n_embd=512 --out_dir=out/bench_offline_25m

Without --ckpt_dir it first trains the default Shakespeare model (or the shape given) for K − 1
steps with a snapshot at every step (the timing does not depend on how far apart the snapshots
are). Two regimes:
  averaging only  the first and last snapshots evaluated on one batch: reading + updating
  with evals      every snapshot evaluated (raw + each setting) on eval_iters batches: what a
                  curve costs; the evaluations of the M settings are work no pass can share
and, to read them against: K snapshot reads alone, and the time of one evaluation.
"""

import contextlib
import dataclasses
import io
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench_common import machine_info
from wagpt import checkpoint
from wagpt.commands import run_command
from wagpt.configurator import main
from wagpt.offline_averaging import AverageConfig, average
from wagpt.report import append_jsonl, markdown_table

REPO = Path(__file__).resolve().parents[1]

# the M = 12 settings: 4 methods x 3 values, a typical first sweep
SWEEP = {"bema": ("bema_bias_power", [-1.0, 0.2, 0.4]),
         "ema": ("ema_decay", [0.7, 0.9, 0.95]),
         "lawa": ("lawa_k", [3, 5, 10]),
         "wa": ("wa_horizon", [5, 10, 20])}


@dataclass
class BenchOfflineConfig:
    ckpt_dir: str | None = None    # a trajectory to time on; None: make one (below)
    out_dir: str = "out/bench_offline"   # the made trajectory and the outputs of the passes
    snapshots: int = 50            # K, when making the trajectory
    dataset: str = "shakespeare_char"  # a prepared folder under data/ ...
    data_dir: str | None = None    # ... or an explicit path
    eval_iters: int = 20           # val batches per evaluation (with_evals regime)
    n_layer: int | None = None     # model shape of the made trajectory; None: the default model
    n_head: int | None = None      # (as n_layer)
    n_embd: int | None = None      # (as n_layer)
    device: str = "cpu"            # 'cpu' | 'cuda' ...
    repeats: int = 1               # timed repeats of each measurement (the median is reported)
    bench_out: str | None = None   # append the result as a JSON line

    def __post_init__(self):
        for key in ("snapshots", "eval_iters", "repeats"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0")


def make_trajectory(cfg):
    snaps = Path(cfg.out_dir) / "run" / "snapshots"
    if len(list(snaps.glob("step_*.safetensors"))) >= cfg.snapshots:
        return snaps
    shape = {key: getattr(cfg, key) for key in ("n_layer", "n_head", "n_embd")
             if getattr(cfg, key) is not None}
    run_command("train.py", [
        f"--out_dir={Path(cfg.out_dir) / 'run'}", f"--dataset={cfg.dataset}",
        *([f"--data_dir={cfg.data_dir}"] if cfg.data_dir else []),
        f"--max_iters={cfg.snapshots - 1}", "--snapshot_interval=1", "--eval_interval=1000000",
        "--warmup_iters=0", "--eval_iters=1", "--averaging=", f"--device={cfg.device}",
        *[f"--{key}={value}" for key, value in shape.items()]], quiet=True)
    return snaps


def settings_config(cfg, ckpt_dir, methods, overrides, eval_every, eval_iters, name):
    return AverageConfig(ckpt_dir=str(ckpt_dir), out_dir=str(Path(cfg.out_dir) / name),
                         methods=methods, dataset=cfg.dataset, data_dir=cfg.data_dir,
                         eval_iters=eval_iters, eval_every=eval_every, device=cfg.device,
                         plot=False, overwrite=True, **overrides)   # passes repeat


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(cfg):
    ckpt_dir = Path(cfg.ckpt_dir) if cfg.ckpt_dir else make_trajectory(cfg)
    files, _, _ = checkpoint.discover(ckpt_dir)
    k, m = len(files), sum(len(values) for _, values in SWEEP.values())
    everything = {key: values for key, values in SWEEP.values()}
    methods = ",".join(SWEEP)
    # averaging only: eval_every past the end evaluates just the first and last snapshots, on
    # one batch, so what is timed is reading + updating; with evals: every snapshot, eval_iters
    regimes = {"averaging_only": (files[-1].step + 1, 1), "with_evals": (0, cfg.eval_iters)}

    def one_pass(eval_every, eval_iters):
        return lambda: average(settings_config(cfg, ckpt_dir, methods, everything, eval_every,
                                               eval_iters, "one_pass"))

    def separate_passes(eval_every, eval_iters):
        def run():
            for method, (key, values) in SWEEP.items():
                for value in values:
                    average(settings_config(cfg, ckpt_dir, method, {key: value}, eval_every,
                                            eval_iters, "separate"))
        return run

    def reads():
        for f in files:
            checkpoint.read_checkpoint(f.path)

    result = {**machine_info(cfg.device), "snapshots": k, "settings": m,
              "eval_iters": cfg.eval_iters}
    result["reads_s"] = timed(reads, cfg.repeats)
    for regime, (eval_every, eval_iters) in regimes.items():
        one = timed(one_pass(eval_every, eval_iters), cfg.repeats)
        separate = timed(separate_passes(eval_every, eval_iters), cfg.repeats)
        result[regime] = {"one_pass_s": one, "separate_s": separate, "ratio": separate / one}
    # what the evaluations add, per evaluation (raw + M settings at each of K snapshots)
    extra = result["with_evals"]["one_pass_s"] - result["averaging_only"]["one_pass_s"]
    result["eval_s"] = extra / ((k - 1) * (m + 1))
    print(f"K = {k} snapshots, M = {m} settings ({', '.join(SWEEP)} x 3), "
          f"{cfg.eval_iters} val batches per evaluation, {result['device']}")
    print(f"reading the {k} snapshots alone: {result['reads_s']:.2f} s; one evaluation: "
          f"{result['eval_s']:.3f} s")
    print(markdown_table([{"regime": regime.replace("_", " "), **result[regime]}
                          for regime in ("averaging_only", "with_evals")], [
        ("regime", "regime"), ("one pass, M settings", lambda r: f"{r['one_pass_s']:.2f} s"),
        ("M single-setting passes", lambda r: f"{r['separate_s']:.2f} s"),
        ("ratio", lambda r: f"{r['ratio']:.1f}x")]))
    if cfg.bench_out:
        append_jsonl(cfg.bench_out, {**result, "config": dataclasses.asdict(cfg)})
    return result


if __name__ == "__main__":
    main(BenchOfflineConfig, bench, __doc__)
