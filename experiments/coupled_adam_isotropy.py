"""
Coupled Adam (Stollenwerk & Stollenwerk 2025, arXiv 2502.08441) vs AdamW on GPT-2 BPE, a small
model, at three amounts of training data: the geometry of the token embedding (isotropy in both
conventions, the norm of the mean embedding relative to the mean norm, the norm-frequency
correlation), over every token's row and over the rows of the tokens the run has seen, and the
val loss. Claims tested: Adam's second moment makes the embeddings anisotropic (a common shift
of all rows, large for rare tokens) and Coupled Adam removes it; and, on large enough data,
Coupled Adam also lowers the loss.

    python -m experiments.coupled_adam_isotropy          # ~1 h on 2 cores
    python -m experiments.coupled_adam_isotropy --smoke=True --seeds=1 --out_dir=/tmp/x

Per seed, data size and optimizer: the default 4-layer, 128-wide model with the GPT-2
vocabulary (50,257 tokens; 6.4M of its 7.2M parameters are the tied embedding) on Shakespeare
in GPT-2 BPE (data/shakespeare: 1.41M train tokens, about 11k distinct), 8 x 32 tokens per
step, peak LR 1e-3 with 100 warmup steps and a cosine to 1e-4, for 400, 800 or 1600 steps
(0.1M, 0.2M, 0.4M tokens; each its own run, as the paper's runs of each size);
`--optimizer=adamw` or `coupled_adam`, `--embedding_weight_decay=0` in both (the paper's pair,
config/train_small_coupled_adam.py and train_small_adamw_baseline.py, differ only in the
optimizer). eval_ckpt.py measures the final model: val loss on 200 batches of 12 x 32 tokens
(the same batches for every model) and the embedding metrics over all rows. The experiment
itself measures every snapshot (every 400 steps) over all rows and over the rows of the tokens
seen so far in the run's batches (replayed: a batch is a pure function of seed and step).

Writes out_dir/{table.md,results.json} and the figure (--figure).
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from experiments import common
from wagpt import checkpoint
from wagpt.checkpoint import snapshot_path
from wagpt.configurator import main
from wagpt.dataloader import get_batch, micro_batch_seed, open_dataset
from wagpt.embedding_metrics import isotropy, norm_stats
from wagpt.report import markdown_table, plot_curves

OPTIMIZERS = {"adamw": "AdamW", "coupled_adam": "Coupled Adam"}
METRICS = {   # eval_ckpt.py's embedding metrics of the final model: key -> what the table calls it
    "isotropy": "isotropy I(E) (ours: ± eigenvectors, token rows)",
    "isotropy_solver_sign_all_rows": "isotropy, Coupled Adam code's convention",
    "norm_ratio": "‖mean embedding‖ / mean ‖embedding‖",
    "mean_norm": "mean ‖embedding‖",
    "norm_logfreq_pearson": "corr(‖e_i‖, log frequency) (ours)",
    "norm_logprob_pearson_all_rows": "corr(‖e_i‖, log p), Coupled Adam code's convention",
}
SEEN_METRICS = {   # measured here per snapshot, over all token rows and over the seen ones
    "isotropy": "isotropy I(E)",
    "norm_ratio": "‖mean e‖ / mean ‖e‖",
    "mean_norm": "mean ‖e‖",
}


@dataclass
class CoupledAdamConfig(common.ExperimentConfig):
    out_dir: str = "out/experiments/coupled_adam_isotropy"
    figure: str = "docs/img/coupled_adam_isotropy.png"
    # regime
    sizes: list[int] = field(default_factory=lambda: [400, 800, 1600])  # training steps of
                                   # each run: its data is steps x batch_size x block_size tokens
    batch_size: int = 8            # sequences per step ...
    block_size: int = 32           # ... of this many tokens
    snapshot_interval: int = 400   # embedding metrics at these steps
    eval_interval: int = 200       # train.py's val loss along the run
    eval_iters: int = 200          # final val loss: eval_ckpt.py, batches of 12, one fixed set


def run_name(optimizer, steps, seed):
    return f"{optimizer}_T{steps}_s{seed}"


def snapshot_steps(cfg, steps):
    return sorted(set(range(0, steps + 1, cfg.snapshot_interval)) | {steps})


def plan(cfg):
    out, runs = Path(cfg.out_dir), []
    data = ([f"--data_dir={cfg.data_dir}"] if cfg.data_dir else ["--dataset=shakespeare"])
    for seed in cfg.seed_values():
        for steps in cfg.sizes:
            for optimizer in OPTIMIZERS:
                name = run_name(optimizer, steps, seed)
                d = out / name
                train = common.train_run(name, d, [
                    "config/train_shakespeare_char.py", *data, f"--optimizer={optimizer}",
                    "--embedding_weight_decay=0.0", "--averaging=", f"--seed={seed}",
                    *(common.SMOKE_MODEL if cfg.smoke else []),
                    f"--batch_size={cfg.batch_size}", f"--block_size={cfg.block_size}",
                    f"--snapshot_interval={cfg.snapshot_interval}",
                    f"--eval_interval={cfg.eval_interval}", "--eval_iters=20",
                    f"--ckpt_interval={steps}",
                    *([f"--warmup_iters={steps // 10}"] if cfg.smoke else [])], steps)
                runs.append(train)
                result = d / "final.json"
                runs.append(common.Run(f"{name}_eval", [
                    "eval_ckpt.py", f"--ckpt={snapshot_path(d / 'snapshots', steps)}", *data,
                    f"--eval_iters={cfg.eval_iters}", "--embeddings=True",
                    f"--out_json={result}", *(["--batch_size=4"] if cfg.smoke else [])],
                    result, after=[train.name]))
    # the longest runs first: they take longest
    return sorted(runs, key=lambda r: -int(r.name.split("_T")[1].split("_")[0]))


def seen_rows_metrics(run_dir, steps, data):
    """{step: {metric: value over all token rows, metric + '_seen': over the rows of the tokens
    the run's batches held (inputs and targets) up to that step}, 'seen_tokens': how many}} at
    every snapshot of the run, its batches replayed from its config."""
    config = common.read_json(Path(run_dir) / "config.json")
    if config.get("gradient_accumulation_steps", 1) < 1:
        raise ValueError(f"{run_dir}: gradient_accumulation_steps must be >= 1")
    vocab = data.vocab_size
    seen = np.zeros(vocab, dtype=bool)
    out, replayed = {}, 0
    for step in steps:
        for s in range(replayed, step):
            for micro in range(config["gradient_accumulation_steps"]):
                x, y = get_batch(data.splits["train"], config["block_size"],
                                 config["batch_size"],
                                 micro_batch_seed(config["seed"], "train", s, micro))
                seen[x.numpy().ravel()] = True
                seen[y.numpy().ravel()] = True
        replayed = step
        record = checkpoint.read_checkpoint(snapshot_path(Path(run_dir) / "snapshots", step))
        E = record.weights["transformer.wte.weight"][:vocab]
        rows = {"isotropy": isotropy(E), **norm_stats(E), "seen_tokens": int(seen.sum())}
        if seen.sum() >= 2:
            E_seen = E[torch.from_numpy(np.flatnonzero(seen))]
            rows.update({f"{k}_seen": v for k, v in
                         {"isotropy": isotropy(E_seen), **norm_stats(E_seen)}.items()})
        out[step] = rows
    return out


def analyze(cfg, started):
    out, seeds = Path(cfg.out_dir), cfg.seed_values()
    data = open_dataset("shakespeare", cfg.data_dir)
    vocab = data.vocab_size
    final, along, val_curves = {}, {}, {}   # (optimizer, steps) -> per seed
    for optimizer in OPTIMIZERS:
        for steps in cfg.sizes:
            for seed in seeds:
                d = out / run_name(optimizer, steps, seed)
                final.setdefault((optimizer, steps), []).append(common.read_json(
                    d / "final.json"))
                along.setdefault((optimizer, steps), []).append(
                    seen_rows_metrics(d, snapshot_steps(cfg, steps), data))
                val_curves.setdefault((optimizer, steps), []).append(
                    {s: r["val_loss"] for s, r in common.evals(d).items()})
    tokens_per_step = cfg.batch_size * cfg.block_size

    def size_label(steps):
        return f"{steps * tokens_per_step / 1e6:.2g}M tokens ({steps} steps)"

    # 1. the val loss as the data grows
    loss_rows = []
    for steps in cfg.sizes:
        a = [r["val_loss"] for r in final[("adamw", steps)]]
        c = [r["val_loss"] for r in final[("coupled_adam", steps)]]
        seen = [m[steps]["seen_tokens"] for m in along[("adamw", steps)]]
        loss_rows.append({"steps": steps, "tokens": steps * tokens_per_step, "seen": seen,
                          "adamw": a, "coupled_adam": c, "diff": common.paired(c, a)})
    table = (f"Val loss of the final model ({cfg.eval_iters} batches of 12 x {cfg.block_size} "
             f"tokens, the same for every model) by the data a run trains on; paired per "
             f"seed:\n\n"
             + markdown_table(loss_rows, [
                 ("training data", lambda r: size_label(r["steps"])),
                 ("distinct tokens seen (of the vocabulary)", lambda r:
                  f"{common.pm(r['seen'], 0)} ({100 * common.mean_std(r['seen'])[0] / vocab:.0f}"
                  f"%)"),
                 ("AdamW", lambda r: common.pm(r["adamw"])),
                 ("Coupled Adam", lambda r: common.pm(r["coupled_adam"])),
                 ("Coupled Adam − AdamW (paired)", lambda r: common.pm(r["diff"],
                                                                        signed=True))]))

    # 2. the embedding at the end of each run: every row and the seen rows
    metric_rows = []
    for key, name in SEEN_METRICS.items():
        for subset, suffix in (("all token rows", ""), ("rows of seen tokens", "_seen")):
            row = {"metric": name, "rows": subset}
            for steps in cfg.sizes:
                for optimizer in OPTIMIZERS:
                    row[(optimizer, steps)] = [m[steps][key + suffix]
                                               for m in along[(optimizer, steps)]]
            metric_rows.append(row)
    for key in ("isotropy_solver_sign_all_rows", "norm_logfreq_pearson",
                "norm_logprob_pearson_all_rows"):
        row = {"metric": METRICS[key], "rows": "all (eval_ckpt.py)"}
        for steps in cfg.sizes:
            for optimizer in OPTIMIZERS:
                row[(optimizer, steps)] = [r["embeddings"][key] for r in final[(optimizer, steps)]]
        metric_rows.append(row)
    columns = [("at the end of the run", "metric"), ("rows", "rows")]
    for steps in cfg.sizes:
        for optimizer, label in OPTIMIZERS.items():
            columns.append((f"{label}, {steps * tokens_per_step / 1e6:.2g}M",
                            lambda r, k=(optimizer, steps): common.pm(r[k])))
    initial = along[("adamw", cfg.sizes[0])]
    table += (f"\n\nThe token embedding at the end of each run (over all {vocab:,} token rows, "
              f"and over the rows of the tokens the run's batches held):\n\n"
              + markdown_table(metric_rows, columns)
              + f"\n\nAt init: isotropy {common.pm([m[0]['isotropy'] for m in initial])}, "
                f"‖mean e‖ / mean ‖e‖ {common.pm([m[0]['norm_ratio'] for m in initial])} "
                f"(all rows). {len(seeds)} seeds; both optimizers start from the same init in a "
                f"seed and see the same batches; a run of each size is its own cosine schedule.")
    results = {"experiment": "coupled_adam_isotropy", "seeds": seeds, "sizes": cfg.sizes,
               "tokens_per_step": tokens_per_step, "vocab_size": vocab,
               "loss_by_size": loss_rows,
               "final": {f"{o}/T={s}": v for (o, s), v in final.items()},
               "along": {f"{o}/T={s}": v for (o, s), v in along.items()},
               "val_curves": {f"{o}/T={s}": v for (o, s), v in val_curves.items()}}
    # table rows keyed by tuples: JSON wants strings
    results["embedding_rows"] = [{(k if isinstance(k, str) else f"{k[0]}/T={k[1]}"): v
                                  for k, v in r.items()} for r in metric_rows]

    # figure: per data size, val loss and the embedding along training
    means, spreads, gain_spreads, reference, groups = {}, {}, {}, {}, {}
    panel_keys = [("isotropy", "isotropy I(E)\nall token rows"),
                  ("isotropy_seen", "isotropy I(E)\nseen tokens' rows"),
                  ("norm_ratio_seen", "‖mean e‖ / mean ‖e‖\nseen tokens' rows")]
    panel_values = {k: ({}, {}) for k, _ in panel_keys}
    for steps in cfg.sizes:
        base_key = f"AdamW, {size_label(steps)}"
        group = groups.setdefault(f"{size_label(steps)}", [])
        for optimizer, label in OPTIMIZERS.items():
            key = f"{label}, {size_label(steps)}"
            group.append(key)
            means[key], spreads[key] = common.curve_stats(val_curves[(optimizer, steps)])
            reference[key] = base_key
            for k, _ in panel_keys:
                per_seed = [{s: m[s][k] for s in m if k in m[s]}
                            for m in along[(optimizer, steps)]]
                panel_values[k][0][key], panel_values[k][1][key] = common.curve_stats(per_seed)
        diffs = [{s: a[s] - c[s] for s in c} for a, c in zip(val_curves[("adamw", steps)],
                                                            val_curves[("coupled_adam", steps)])]
        gain_spreads[f"Coupled Adam, {size_label(steps)}"] = common.curve_stats(diffs)[1]
    panels = [(name, *panel_values[k]) for k, name in panel_keys]
    plot_curves(means, cfg.figure, common.figure_title(
        cfg, f"4 x 128 GPT, GPT-2 vocabulary, Shakespeare in GPT-2 BPE, {cfg.batch_size} x "
             f"{cfg.block_size} tokens per step, three amounts of data: AdamW vs Coupled Adam, "
             f"embedding undecayed in both;\nval loss (train.py, 20 batches) and the "
             f"embedding's isotropy and mean along training"),
        reference=reference, spread=spreads, gain_spread=gain_spreads, panels=panels,
        unit="nats/token", groups=groups)
    return common.write_outputs(cfg, results, table, started)


def smoke_settings(cfg):
    """--smoke=True: a tiny regime that runs every step of the pipeline in seconds."""
    return {"sizes": [10, 20], "snapshot_interval": 5, "eval_interval": 5, "eval_iters": 2,
            "batch_size": 4, "block_size": 16}


def run(cfg):
    return common.run_experiment(cfg, plan, analyze, smoke_settings)


if __name__ == "__main__":
    main(CoupledAdamConfig, run, __doc__)
