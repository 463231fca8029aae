"""
Coupled Adam (Stollenwerk & Stollenwerk 2025, arXiv 2502.08441) vs AdamW on GPT-2 BPE, a small
model: the geometry of the token embedding (isotropy in both conventions, the norm of the mean
embedding relative to the mean norm, the norm-frequency correlation) and the val loss. Claim
tested: Adam's second moment makes the embeddings anisotropic (a common shift of all rows, large
for rare tokens); Coupled Adam removes it.

    python -m experiments.coupled_adam_isotropy          # ~30 min on 2 cores
    python -m experiments.coupled_adam_isotropy --smoke=True --seeds=1 --out_dir=/tmp/x

Per seed and optimizer: the default 4-layer, 128-wide model with the GPT-2 vocabulary (50,257
tokens; 6.4M of its 7.2M parameters are the tied embedding) on Shakespeare in GPT-2 BPE
(data/shakespeare: 1.41M train tokens, about 11k distinct), 8 x 32 tokens per step, peak LR 1e-3
with 100 warmup steps and a cosine to 1e-4, 800 steps; `--optimizer=adamw` or `coupled_adam`,
`--embedding_weight_decay=0` in both (the paper's pair, config/train_small_coupled_adam.py and
train_small_adamw_baseline.py, differ only in the optimizer). eval_ckpt.py then measures the
embedding of every snapshot (every 200 steps), and the final model's val loss on 200 batches
of 12 x 32 tokens, the same batches for every model.

Writes out_dir/{table.md,results.json} and the figure (--figure).
"""

from dataclasses import dataclass
from pathlib import Path

from experiments import common
from wagpt.checkpoint import snapshot_path
from wagpt.configurator import main
from wagpt.report import markdown_table, plot_curves

OPTIMIZERS = {"adamw": "AdamW", "coupled_adam": "Coupled Adam"}
METRICS = {   # eval_ckpt.py's embedding metrics: key -> what the table calls it
    "isotropy": "isotropy I(E) (ours: ± eigenvectors, token rows)",
    "isotropy_solver_sign_all_rows": "isotropy, Coupled Adam code's convention",
    "norm_ratio": "‖mean embedding‖ / mean ‖embedding‖",
    "mean_norm": "mean ‖embedding‖",
    "norm_logfreq_pearson": "corr(‖e_i‖, log frequency) (ours)",
    "norm_logprob_pearson_all_rows": "corr(‖e_i‖, log p), Coupled Adam code's convention",
}

PANEL_LABELS = {"isotropy": "isotropy I(E)\n(ours)",
                "isotropy_solver_sign_all_rows": "isotropy I(E)\n(Coupled Adam code)",
                "norm_ratio": "‖mean e‖ / mean ‖e‖"}


@dataclass
class CoupledAdamConfig(common.ExperimentConfig):
    out_dir: str = "out/experiments/coupled_adam_isotropy"
    figure: str = "docs/img/coupled_adam_isotropy.png"
    # regime
    steps: int = 800               # training steps per run
    batch_size: int = 8            # sequences per step ...
    block_size: int = 32           # ... of this many tokens
    snapshot_interval: int = 200   # embedding metrics at these steps (eval_ckpt.py)
    eval_interval: int = 200       # train.py's val loss along the run
    eval_iters: int = 200          # final val loss: eval_ckpt.py, batches of 12, one fixed set


def run_name(optimizer, seed):
    return f"{optimizer}_s{seed}"


def snapshot_steps(cfg):
    return list(range(0, cfg.steps + 1, cfg.snapshot_interval))


def plan(cfg):
    out, runs = Path(cfg.out_dir), []
    data = ([f"--data_dir={cfg.data_dir}"] if cfg.data_dir else ["--dataset=shakespeare"])
    for seed in cfg.seed_values():
        for optimizer in OPTIMIZERS:
            d = out / run_name(optimizer, seed)
            train = common.train_run(run_name(optimizer, seed), d, [
                "config/train_shakespeare_char.py", *data, f"--optimizer={optimizer}",
                "--embedding_weight_decay=0.0", "--averaging=", f"--seed={seed}",
                *(common.SMOKE_MODEL if cfg.smoke else []),
                f"--batch_size={cfg.batch_size}", f"--block_size={cfg.block_size}",
                f"--snapshot_interval={cfg.snapshot_interval}",
                f"--eval_interval={cfg.eval_interval}", "--eval_iters=20",
                f"--ckpt_interval={cfg.steps}",
                *([f"--warmup_iters={cfg.steps // 10}"] if cfg.smoke else [])], cfg.steps)
            runs.append(train)
            for step in snapshot_steps(cfg):
                final = step == cfg.steps
                result = d / "embeddings" / f"step_{step:07d}.json"
                runs.append(common.Run(f"{run_name(optimizer, seed)}_eval{step}", [
                    "eval_ckpt.py", f"--ckpt={snapshot_path(d / 'snapshots', step)}", *data,
                    f"--eval_iters={cfg.eval_iters if final else 0}", "--embeddings=True",
                    f"--out_json={result}", *(["--batch_size=4"] if cfg.smoke else [])],
                    result, after=[train.name]))
    return runs


def analyze(cfg, started):
    out, seeds, steps = Path(cfg.out_dir), cfg.seed_values(), snapshot_steps(cfg)
    metrics, val_curves, final_loss = {}, {}, {}
    for optimizer in OPTIMIZERS:
        for seed in seeds:
            d = out / run_name(optimizer, seed)
            per_step = {s: common.read_json(d / "embeddings" / f"step_{s:07d}.json")
                        for s in steps}
            for key in METRICS:
                metrics.setdefault((optimizer, key), []).append(
                    {s: r["embeddings"][key] for s, r in per_step.items()})
            final_loss.setdefault(optimizer, []).append(per_step[cfg.steps]["val_loss"])
            val_curves.setdefault(optimizer, []).append(
                {s: r["val_loss"] for s, r in common.evals(d).items()})
    rows = []
    for key, name in [("val_loss", f"val loss (final, {cfg.eval_iters} batches)"),
                      *METRICS.items()]:
        values = ({o: final_loss[o] for o in OPTIMIZERS} if key == "val_loss" else
                  {o: [c[cfg.steps] for c in metrics[(o, key)]] for o in OPTIMIZERS})
        initial = None if key == "val_loss" else [c[0] for c in metrics[("adamw", key)]]
        rows.append({"metric": name, "key": key, "initial": initial, **values,
                     "diff": common.paired(values["coupled_adam"], values["adamw"])})
    table = markdown_table(rows, [
        ("at step " + str(cfg.steps), "metric"),
        ("at init", lambda r: "" if r["initial"] is None else common.pm(r["initial"])),
        ("AdamW", lambda r: common.pm(r["adamw"])),
        ("Coupled Adam", lambda r: common.pm(r["coupled_adam"])),
        ("Coupled Adam − AdamW (paired)", lambda r: common.pm(r["diff"], signed=True))])
    rows_measured = common.read_json(out / run_name("adamw", seeds[0]) / "embeddings" /
                                     f"step_{cfg.steps:07d}.json")["embeddings"]["rows"]
    table += (f"\n\n{len(seeds)} seeds; embedding metrics (eval_ckpt.py) over the "
              f"{rows_measured:,} token rows; both optimizers start from the same init in a "
              f"seed and see the same batches.")
    results = {"experiment": "coupled_adam_isotropy", "seeds": seeds, "rows": rows,
               "metrics": {f"{o}/{k}": v for (o, k), v in metrics.items()},
               "val_curves": val_curves}

    means, spreads, gain_spreads = {}, {}, {}
    for optimizer, label in OPTIMIZERS.items():
        means[label], spreads[label] = common.curve_stats(val_curves[optimizer])
    diffs = [{s: a[s] - c[s] for s in c} for a, c in zip(val_curves["adamw"],
                                                          val_curves["coupled_adam"])]
    gain_spreads["Coupled Adam"] = common.curve_stats(diffs)[1]
    panels = []
    for key in ("isotropy", "isotropy_solver_sign_all_rows", "norm_ratio"):
        values, bands = {}, {}
        for optimizer, label in OPTIMIZERS.items():
            values[label], bands[label] = common.curve_stats(metrics[(optimizer, key)])
        panels.append((PANEL_LABELS[key], values, bands))
    plot_curves(means, cfg.figure, common.figure_title(
        cfg, f"4 x 128 GPT, GPT-2 vocabulary, Shakespeare in GPT-2 BPE, {cfg.steps} steps of "
             f"{cfg.batch_size} x {cfg.block_size} tokens:\nAdamW vs Coupled Adam, embedding "
             f"undecayed in both; val loss (train.py, 20 batches) and embedding metrics"),
        spread=spreads, gain_spread=gain_spreads, panels=panels)
    return common.write_outputs(cfg, results, table, started)


def smoke_settings(cfg):
    """--smoke=True: a tiny regime that runs every step of the pipeline in seconds."""
    return {"steps": 10, "snapshot_interval": 5, "eval_interval": 5, "eval_iters": 2,
            "batch_size": 4, "block_size": 16}


def run(cfg):
    return common.run_experiment(cfg, plan, analyze, smoke_settings)


if __name__ == "__main__":
    main(CoupledAdamConfig, run, __doc__)
