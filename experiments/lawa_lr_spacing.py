"""
LAWA (Sanyal et al. 2024, arXiv 2306.03241): the gain of averaging the latest checkpoints over
the raw weights at the default and at a 10x higher peak LR, with the spacing Δ of the averaged
checkpoints varied at fixed k = 5; EMAs of the same mean age alongside. Claims tested: the gain
is larger at high LR, and grows with the spacing.

    python -m experiments.lawa_lr_spacing                # ~25 min on 2 cores
    python -m experiments.lawa_lr_spacing --smoke=True --seeds=1 --out_dir=/tmp/x

Per seed and peak LR (1e-3, the default recipe, and 1e-2 as `bash compare.sh`; cosine to LR/10,
100 warmup steps, batch 12 x 64) one training run of 4000 steps with a snapshot every 5 steps,
then average.py over its snapshots from step 100 (after the warmup: no window holds the random
init): LAWA k = 5 at Δ = 5, 10, 20, 40 steps (1, 2, 4, 8 snapshots), so the widest window, kΔ
= 200 steps, is 5% of the run (the paper's Δ = 1000 of 70k steps is 1.4% per spacing, 7% per
window), and an EMA per snapshot with the same mean age as each window (2Δ: decay 2Δ/(2Δ + 1)
per snapshot), the raw weights and every average on the same val batches. Runs of one seed see
the same batches at both LRs, so every difference is paired.

Writes out_dir/{table.md,results.json} and the figure (--figure).
"""

from dataclasses import dataclass, field
from pathlib import Path

from experiments import common
from wagpt.configurator import main
from wagpt.report import markdown_table, plot_curves


@dataclass
class LawaConfig(common.ExperimentConfig):
    out_dir: str = "out/experiments/lawa_lr_spacing"
    figure: str = "docs/img/lawa_lr_spacing.png"
    # regime
    learning_rates: list[float] = field(default_factory=lambda: [1e-3, 1e-2])  # peak LRs
    steps: int = 4000              # training steps per run
    snapshot_interval: int = 5     # steps between snapshots (LAWA's Δ = 1 snapshot)
    spacings: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # Δ in snapshots, k = 5
    average_from: int = 100        # the averages' first snapshot: the end of the warmup
    eval_every: int = 500          # average.py evaluates at these steps
    eval_iters: int = 50           # val batches per evaluation

    def __post_init__(self):
        widest = 5 * max(self.spacings) * self.snapshot_interval
        if widest > self.steps:
            raise ValueError(f"the widest window (k = 5 x {max(self.spacings)} snapshots x "
                             f"{self.snapshot_interval} steps) is longer than the run "
                             f"({self.steps} steps)")


def run_name(lr, seed):
    return f"lr{lr:g}_s{seed}"


def ema_decay(spacing):
    """Per snapshot, the EMA whose mean age (d / (1 - d) snapshots) is LAWA's: 2 x spacing."""
    return 2 * spacing / (2 * spacing + 1)


def labels(cfg):
    """average.py setting label -> our label, in plotting order."""
    out = {}
    for d in cfg.spacings:
        out[f"lawa[lawa_interval={d * cfg.snapshot_interval}]"] = \
            f"LAWA Δ={d * cfg.snapshot_interval}"
    for d in cfg.spacings:
        out[f"ema[ema_decay={ema_decay(d)!r}]"] = f"EMA age {2 * d * cfg.snapshot_interval}"
    return out


def plan(cfg):
    out, runs = Path(cfg.out_dir), []
    smoke = common.SMOKE_MODEL if cfg.smoke else []
    for seed in cfg.seed_values():
        for lr in cfg.learning_rates:
            d = out / run_name(lr, seed)
            runs.append(common.train_run(run_name(lr, seed), d, [
                "config/train_shakespeare_char.py", *common.dataset_args(cfg, "shakespeare_char"),
                f"--learning_rate={lr}", f"--min_lr={lr / 10}", "--averaging=",
                f"--snapshot_interval={cfg.snapshot_interval}", f"--eval_interval={cfg.steps}",
                f"--ckpt_interval={cfg.steps}", f"--seed={seed}", *smoke,
                f"--eval_iters={cfg.eval_iters}",
                *([f"--warmup_iters={cfg.steps // 20}"] if cfg.smoke else [])], cfg.steps))
            runs.append(common.Run(f"{run_name(lr, seed)}_average", [
                "average.py", f"--ckpt_dir={d / 'snapshots'}", f"--out_dir={d / 'averages'}",
                "--methods=lawa,ema", "--lawa_k=5", "--offline_time=snapshots",
                f"--lawa_start={cfg.average_from}", f"--ema_update_after={cfg.average_from}",
                f"--lawa_interval={[s * cfg.snapshot_interval for s in cfg.spacings]}",
                f"--ema_decay={[ema_decay(s) for s in cfg.spacings]}",
                f"--eval_every={cfg.eval_every}", f"--eval_iters={cfg.eval_iters}",
                f"--batch_size={4 if cfg.smoke else 12}", f"--seed={seed}", "--plot=False",
                *([f"--data_dir={cfg.data_dir}"] if cfg.data_dir else [])],
                d / "averages" / "results.json", after=[run_name(lr, seed)]))
    return runs


def analyze(cfg, started):
    out, seeds = Path(cfg.out_dir), cfg.seed_values()
    names = labels(cfg)
    curves = {}   # (lr, label) -> per seed {step: val loss}
    for seed in seeds:
        for lr in cfg.learning_rates:
            rows = common.average_rows(out / run_name(lr, seed) / "averages")
            for setting, label in {"raw": "raw", **names}.items():
                curves.setdefault((lr, label), []).append(
                    {step: loss for (s, step), loss in rows.items() if s == setting})
    # the steps every curve has (the averages start at average_from)
    steps = sorted(set.intersection(*(set(c) for per_seed in curves.values() for c in per_seed)))
    report_steps = [s for s in steps if s in {cfg.steps // 8, cfg.steps // 4, cfg.steps // 2,
                                              3 * cfg.steps // 4, cfg.steps}]

    def window(label):
        """The steps an average spans and their share of the run: LAWA's k·Δ, an EMA's twice
        its mean age."""
        span = (5 * int(label.split("=")[1]) if label.startswith("LAWA")
                else 2 * int(label.split()[-1]))
        return f"{span} steps ({100 * span / cfg.steps:.2g}%)"

    def gains(lr, label, step):
        return common.paired([c[step] for c in curves[(lr, "raw")]],
                             [c[step] for c in curves[(lr, label)]])

    rows = []
    for lr in cfg.learning_rates:
        rows.append({"lr": lr, "method": "raw", "window": "", **{
            s: common.pm([c[s] for c in curves[(lr, "raw")]]) for s in report_steps}})
        for label in names.values():
            rows.append({"lr": lr, "method": label, "window": window(label), **{
                s: common.pm(gains(lr, label, s), signed=True) for s in report_steps}})
    table = (f"Val loss of the raw weights, and the gain of each average over them (raw − "
             f"average, paired per seed; > 0: the average is better), by step; averages from "
             f"step {cfg.average_from}, runs of {cfg.steps} steps:\n\n"
             + markdown_table(rows, [("peak LR", lambda r: f"{r['lr']:g}"),
                                     ("weights", "method"),
                                     ("window (LAWA: kΔ; EMA: 2 × mean age)", "window")]
                              + [(f"step {s}", s) for s in report_steps]))
    # claim 1: gain at the high LR − gain at the default LR, same seed (same batches)
    lo, hi = cfg.learning_rates[0], cfg.learning_rates[-1]
    lr_rows = [{"method": label, **{s: common.pm(common.paired(gains(hi, label, s),
                                                               gains(lo, label, s)), signed=True)
                                    for s in report_steps}} for label in names.values()]
    table += (f"\n\nGain at peak LR {hi:g} minus gain at {lo:g} (paired per seed; > 0: "
              f"averaging helps more at the high LR):\n\n" + markdown_table(
                  lr_rows, [("average", "method")] + [(f"step {s}", s) for s in report_steps]))
    table += f"\n\n{len(seeds)} seeds; val loss on {cfg.eval_iters} val batches per seed."
    results = {"experiment": "lawa_lr_spacing", "seeds": seeds, "steps": steps,
               "table_steps": report_steps,
               "gains": {f"{lr:g}/{label}": {s: gains(lr, label, s) for s in steps}
                         for lr in cfg.learning_rates for label in names.values()},
               "raw": {f"{lr:g}": {s: [c[s] for c in curves[(lr, "raw")]] for s in steps}
                       for lr in cfg.learning_rates},
               "curves": {f"{lr:g}/{label}": c for (lr, label), c in curves.items()}}

    means, spreads, gain_spreads, reference, groups = {}, {}, {}, {}, {}
    for kind in ("LAWA", "EMA"):
        for lr in cfg.learning_rates:
            members = [label for label in names.values() if label.startswith(kind)]
            group = groups.setdefault(f"{kind}, peak LR {lr:g}", [f"raw, LR {lr:g}"])
            for label in ["raw"] + members:
                key = f"{label}, LR {lr:g}"
                if label != "raw":
                    group.append(key)
                if key in means:
                    continue
                means[key], spreads[key] = common.curve_stats(
                    [{s: c[s] for s in steps} for c in curves[(lr, label)]])
                reference[key] = f"raw, LR {lr:g}"
                if label != "raw":
                    gain_spreads[key] = common.curve_stats(
                        [{s: r[s] - c[s] for s in steps}
                         for r, c in zip(curves[(lr, "raw")], curves[(lr, label)])])[1]
    plot_curves(means, cfg.figure, common.figure_title(
        cfg, f"default char model, cosine to LR/10 over {cfg.steps} steps, at two peak LRs: raw "
             f"weights, LAWA (k = 5) at four spacings Δ and EMAs of the same mean age, from "
             f"step {cfg.average_from}; gains over the raw weights of the same LR"),
        reference=reference, spread=spreads, gain_spread=gain_spreads, unit="nats/char",
        groups=groups)
    return common.write_outputs(cfg, results, table, started)


def smoke_settings(cfg):
    """--smoke=True: a tiny regime that runs every step of the pipeline in seconds."""
    return {"steps": 20, "snapshot_interval": 1, "eval_every": 5, "eval_iters": 2,
            "average_from": 1}


def run(cfg):
    return common.run_experiment(cfg, plan, analyze, smoke_settings)


if __name__ == "__main__":
    main(LawaConfig, run, __doc__)
