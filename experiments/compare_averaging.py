"""
Every averaging method over the same training runs, over seeds (what `bash compare.sh` runs on
CPU): per seed, train the default character-level model at a high LR (config/compare_shakespeare.py:
peak 1e-2, cosine to 1e-3, 2000 steps, a snapshot every 50 steps), then average.py's sweep
(config/avg_compare_shakespeare.py) over its snapshots in one pass. Each method's setting is
chosen per seed on held-out val batches (average.py's select_iters, drawn with seed + 1) and
reported on the eval batches, so no gain is measured on the batches that picked its setting.

    python -m experiments.compare_averaging                 # 3 seeds, ~50 min on 2 cores
    python -m experiments.compare_averaging --smoke=True --seeds=1 --out_dir=/tmp/x

Per method: the chosen setting of each seed, the val loss at the last step and the gain over
the raw weights of the same seed (paired), mean ± std over seeds, and the seeds in which it
gains. Writes out_dir/{table.md,results.json} and the figure (--figure with --publish).
"""

from dataclasses import dataclass
from pathlib import Path

from experiments import common
from wagpt.configurator import main
from wagpt.offline_averaging import method_label
from wagpt.report import markdown_table, plot_curves


@dataclass
class CompareConfig(common.ExperimentConfig):
    out_dir: str = "out/experiments/compare_averaging"
    figure: str = "docs/img/compare_shakespeare.png"
    train_config: str = "config/compare_shakespeare.py"      # step 1: the training runs
    average_config: str = "config/avg_compare_shakespeare.py"  # step 2: the sweep
    max_iters: int = 2000          # training steps (the train config's)


def plan(cfg):
    out, runs = Path(cfg.out_dir), []
    smoke = common.SMOKE_MODEL + ["--warmup_iters=2", "--snapshot_interval=2"] if cfg.smoke else []
    for seed in cfg.seed_values():
        run = out / f"s{seed}" / "run"
        runs.append(common.train_run(f"s{seed}", run, [
            cfg.train_config, f"--seed={seed}", *common.dataset_args(cfg, "shakespeare_char"),
            "--averaging=", *smoke], cfg.max_iters))
        runs.append(common.Run(f"s{seed}_average", [
            "average.py", cfg.average_config, f"--ckpt_dir={run / 'snapshots'}",
            f"--out_dir={out / f's{seed}' / 'averaging'}", f"--seed={seed}", "--plot=False",
            "--overwrite=True", *([f"--data_dir={cfg.data_dir}"] if cfg.data_dir else []),
            *(["--eval_iters=2", "--batch_size=4", "--eval_every=2", "--methods=ema,lawa"]
              if cfg.smoke else [])],
            out / f"s{seed}" / "averaging" / "results.json", after=[f"s{seed}"]))
    return runs


def analyze(cfg, started):
    out, seeds = Path(cfg.out_dir), cfg.seed_values()
    results = [common.read_json(out / f"s{seed}" / "averaging" / "results.json")
               for seed in seeds]
    best = [{method_label(b): b for b in r["best"]} for r in results]
    methods = [m for m in best[0] if all(m in b for b in best)]
    raw = [b["raw"]["val_loss"] for b in best]
    rows = []
    for method in methods:
        chosen = [b[method] for b in best]
        gains = [r - c["val_loss"] for r, c in zip(raw, chosen)]
        rows.append({"method": method,
                     "setting chosen per seed": ", ".join(
                         dict.fromkeys(c["setting"] for c in chosen)),
                     "chosen on": "" if method == "raw" else ", ".join(
                         dict.fromkeys(c["chosen_on"] for c in chosen)),
                     "val loss": common.pm([c["val_loss"] for c in chosen]),
                     "gain over raw": "" if method == "raw" else common.pm(gains, signed=True),
                     "seeds with a gain": "" if method == "raw" else
                     f"{sum(g > 0 for g in gains)} of {len(gains)}"})
    last = max(r["step"] for r in results[0]["rows"])
    table = (f"Every method over the same runs (config/compare_shakespeare.py, {len(seeds)} "
             f"seed{'s' if len(seeds) > 1 else ''}), at step {last}: each method's setting "
             f"chosen per seed on held-out val batches, its loss on the eval batches "
             f"(nats/char), the gain paired with the raw weights of the same seed.\n\n"
             + markdown_table(rows, [(key, key) for key in rows[0]]))
    # the curves: per seed the chosen setting's, mean over seeds
    curves = {}
    for method in methods:
        per_seed = []
        for r, b in zip(results, best):
            setting = b[method]["setting"]
            per_seed.append({row["step"]: row["val_loss"] for row in r["rows"]
                             if row["setting"] == setting})
        curves[method] = per_seed
    means, spreads, gain_spreads = {}, {}, {}
    for method, per_seed in curves.items():   # each from the steps every seed's choice has
        steps = sorted(set.intersection(*(set(c) for c in per_seed)))
        means[method], spreads[method] = common.curve_stats(
            [{s: c[s] for s in steps} for c in per_seed])
        if method != "raw":
            gain_spreads[method] = common.curve_stats(
                [{s: r[s] - c[s] for s in steps} for r, c in zip(curves["raw"], per_seed)])[1]
    plot_curves(means, cfg.figure, common.figure_title(
        cfg, "every method over the same high-LR run (peak 1e-2, cosine to 1e-3): raw weights and "
             "each method's setting chosen on held-out batches; gains over the raw weights"),
        spread=spreads, gain_spread=gain_spreads, unit="nats/char")
    summary = {"step": last, "seeds": seeds, "table": rows,
               "best": {str(seed): b for seed, b in zip(seeds, best)}}
    return common.write_outputs(cfg, summary, table, started)


def smoke_settings(cfg):
    """--smoke=True: a tiny model for a few steps, two methods."""
    return {"max_iters": 6}


def run(cfg):
    return common.run_experiment(cfg, plan, analyze, smoke_settings)


if __name__ == "__main__":
    main(CompareConfig, run, __doc__)
