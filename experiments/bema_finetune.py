"""
BEMA in its own regime (Block & Zhang 2025, arXiv 2508.00180): fine-tuning a pretrained model
with small, noisy batches. Claim tested: BEMA converges faster than EMA and than the raw
iterate, and ends at least as good; here at the update period φ (bema_update_freq) the authors
use as well as every step.

    python -m experiments.bema_finetune                  # ~45 min on 2 cores
    python -m experiments.bema_finetune --seeds=3 --smoke=True --out_dir=/tmp/x

1. Pretrain the default character-level model on Shakespeare's plays (2000 steps, the default
   recipe; data/shakespeare_char_plays).
2. Per seed, fine-tune it on his poems (data/shakespeare_char_poems, same vocabulary) with
   config/finetune_shakespeare_char.py: batch 4 x 64 characters, constant LR 3e-4, 400 steps, an
   eval every 10 steps; θ₀ = the pretrained snapshot, every averager starting there. Two runs
   per seed with the same raw trajectory (averaging never changes training), both updating
   every step (φ = 1): BEMA at the paper's settings + DEMA + OUEMA, and the paper's EMA baseline
   (BEMA with bias_power -1). The first also keeps a snapshot every 10 steps.
3. Per seed, average.py over θ₀ and those snapshots (one pass): BEMA and its EMA twin at every
   other φ of `update_freqs` (10, 20, 40, 100), β_t and α_t counted in steps as in the
   authors' code and TRL's BEMACallback (docs/averaging.md), evaluated on the same val batches
   as the training runs (checked: average.py's raw weights give train.py's numbers).
4. Per method and φ: the val loss along the run, at `report_steps` and at the end, the steps to
   reach the raw model's final loss (same seed) and half its fine-tuning gain, paired
   differences (BEMA − its EMA twin, each − the EMA updated every step).

Writes out_dir/{table.md,results.json} and the figure (--figure).
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from experiments import common
from wagpt.checkpoint import snapshot_path
from wagpt.configurator import main
from wagpt.report import markdown_table, plot_curves

EMA_LABEL, BEMA_LABEL = "EMA φ={}", "BEMA φ={}"   # BEMA with bias_power -1 / the paper's 0.2
# the methods the online runs (every step) add: label -> (run, metrics key)
ONLINE_ONLY = {"DEMA φ=1": ("bema", "val_loss/dema"), "OUEMA φ=1": ("bema", "val_loss/ouema")}


@dataclass
class BemaFinetuneConfig(common.ExperimentConfig):
    out_dir: str = "out/experiments/bema_finetune"
    figure: str = "docs/img/bema_finetune.png"
    seeds: int = 5                 # fine-tuning seeds (batches, eval batches); one pretraining
    # regime
    pretrain_iters: int = 2000     # steps of the default recipe on the plays
    finetune_iters: int = 400      # fine-tuning steps (config/finetune_shakespeare_char.py)
    eval_interval: int = 10        # fine-tuning steps between evals (the config's)
    update_freqs: list[int] = field(default_factory=lambda: [1, 10, 20, 40, 100])  # φ: BEMA and
                                   # its EMA twin act every φ steps (1: online, in the two
                                   # training runs; the others offline, from their snapshots)
    report_steps: list[int] = field(default_factory=lambda: [20, 40, 100, 200, 400])  # the
                                   # fine-tuning steps of the table of gains along the run
    finetune_data_dir: str | None = None  # another fine-tuning dataset (tests)

    def __post_init__(self):
        if 1 not in self.update_freqs or any(f < 1 for f in self.update_freqs):
            raise ValueError(f"update_freqs={self.update_freqs}: give periods >= 1, including "
                             f"1 (the online runs, and the reference EMA)")


def offline_freqs(cfg):
    return [f for f in cfg.update_freqs if f > 1]


def snapshot_interval(cfg):
    """The fine-tuning run keeps a snapshot at every step an offline φ acts at (and every eval)."""
    return math.gcd(cfg.eval_interval, *offline_freqs(cfg))


def labels(cfg):
    """Every curve, in table order: raw, then per φ the EMA and BEMA, then DEMA and OUEMA."""
    out = ["raw"]
    for f in cfg.update_freqs:
        out += [EMA_LABEL.format(f), BEMA_LABEL.format(f)]
    return out + list(ONLINE_ONLY)


def plan(cfg):
    out = Path(cfg.out_dir)
    smoke = common.SMOKE_MODEL if cfg.smoke else []
    pre, end = cfg.pretrain_iters, cfg.pretrain_iters + cfg.finetune_iters
    runs = [common.train_run(
        "pretrain", out / "pretrain",
        ["config/train_shakespeare_char.py", *common.dataset_args(cfg, "shakespeare_char_plays"),
         "--averaging=", f"--snapshot_interval={pre}", f"--eval_interval={pre}",
         f"--ckpt_interval={pre}", *smoke, *(["--warmup_iters=2"] if cfg.smoke else [])], pre)]
    theta0 = snapshot_path(out / "pretrain" / "snapshots", pre)
    finetune_data = ([f"--data_dir={cfg.finetune_data_dir}"] if cfg.finetune_data_dir else [])
    for seed in cfg.seed_values():
        d = out / f"s{seed}"
        base = ["config/finetune_shakespeare_char.py", f"--init_from={theta0}", f"--seed={seed}",
                *finetune_data, f"--bema_update_after={pre}", "--bema_update_freq=1",
                f"--dema_update_after={pre}", f"--ouema_update_after={pre}",
                f"--ckpt_interval={end}", *smoke, f"--eval_interval={cfg.eval_interval}"]
        bema = common.train_run(f"s{seed}_bema", d / "bema", base + (
            [f"--snapshot_interval={snapshot_interval(cfg)}"] if offline_freqs(cfg) else []),
            end, after=["pretrain"])
        runs.append(bema)
        runs.append(common.train_run(f"s{seed}_ema", d / "ema",
                                     base + ["--averaging=bema", "--bema_bias_power=-1.0"],
                                     end, after=["pretrain"]))
        if not offline_freqs(cfg):
            continue
        trajectory = d / "trajectory"   # θ₀ and the fine-tuning run's snapshots after it

        def link(trajectory=trajectory, snapshots=d / "bema" / "snapshots"):
            common.link_files(trajectory, [theta0, *sorted(snapshots.glob("step_*"))])

        eval_data = finetune_data or ["--dataset=shakespeare_char_poems"]   # the config's
        runs.append(common.Run(f"s{seed}_offline", [
            "average.py", f"--ckpt_dir={trajectory}", f"--out_dir={d / 'offline'}",
            "--methods=bema", f"--bema_update_freq={offline_freqs(cfg)}",
            "--bema_bias_power=[-1.0,0.2]", f"--bema_update_after={pre}",
            "--bema_ema_power=0.5", "--bema_lag=10.0", "--bema_multiplier=1.0",
            f"--eval_every={cfg.eval_interval}", f"--eval_iters={2 if cfg.smoke else 100}",
            f"--batch_size={4}", f"--seed={seed}", "--plot=False", *eval_data],
            d / "offline" / "results.json", after=[bema.name], prepare=link))
    return runs


def first_step_at_or_below(curve, target):
    return next((t for t, loss in sorted(curve.items()) if loss <= target), None)


def offline_curves(out_dir, pre):
    """{(φ, bias_power): {fine-tuning step: val loss}} and {step: raw val loss} of an average.py
    run over the trajectory."""
    rows = common.read_json(Path(out_dir) / "results.json")["rows"]
    curves, raw = {}, {}
    for r in rows:
        if r["method"] == "raw":
            raw[r["step"] - pre] = r["val_loss"]
        elif r["method"] == "bema":
            hp = json.loads(r["hparams"])
            key = (hp["bema_update_freq"], float(hp["bema_bias_power"]))
            curves.setdefault(key, {})[r["step"] - pre] = r["val_loss"]
    return curves, raw


def analyze(cfg, started):
    out = Path(cfg.out_dir)
    pre, seeds = cfg.pretrain_iters, cfg.seed_values()
    names = labels(cfg)
    curves = {label: [] for label in names}   # per label, per seed: {fine-tuning step: loss}
    raw_identical, offline_raw_diff = True, 0.0
    for seed in seeds:
        d = out / f"s{seed}"
        runs = {name: common.evals(d / name) for name in ("bema", "ema")}
        raw_identical &= all(runs["bema"][s]["val_loss/raw"] == runs["ema"][s]["val_loss/raw"]
                             for s in runs["bema"])
        raw = {s - pre: r["val_loss/raw"] for s, r in runs["bema"].items()}
        curves["raw"].append(raw)
        curves[EMA_LABEL.format(1)].append({s - pre: r["val_loss/bema"]
                                            for s, r in runs["ema"].items()})
        curves[BEMA_LABEL.format(1)].append({s - pre: r["val_loss/bema"]
                                             for s, r in runs["bema"].items()})
        for label, (run, key) in ONLINE_ONLY.items():
            curves[label].append({s - pre: r[key] for s, r in runs[run].items()})
        if offline_freqs(cfg):
            offline, offline_raw = offline_curves(d / "offline", pre)
            offline_raw_diff = max([offline_raw_diff] + [abs(v - raw[s])
                                                         for s, v in offline_raw.items()])
            for f in offline_freqs(cfg):
                curves[EMA_LABEL.format(f)].append(offline[(f, -1.0)])
                curves[BEMA_LABEL.format(f)].append(offline[(f, 0.2)])
    last = cfg.finetune_iters
    ref = EMA_LABEL.format(1)   # the EMA updated every step: the previous winner

    def at(label, step):
        return [c[step] for c in curves[label]]

    def twin(label):
        return EMA_LABEL.format(label.split("=")[1]) if label.startswith("BEMA") else None

    raw_finals, raw_starts = at("raw", last), at("raw", 0)
    halves = [s - (s - f) / 2 for s, f in zip(raw_starts, raw_finals)]
    per_method = {}
    for label in names:
        per_method[label] = {
            "final": at(label, last),
            "gain_over_raw": common.paired(raw_finals, at(label, last)),
            "gain_over_ema_every_step": common.paired(at(ref, last), at(label, last)),
            "gain_over_ema_twin": (common.paired(at(twin(label), last), at(label, last))
                                   if twin(label) else None),
            "lowest": [min(c.values()) for c in curves[label]],
            "steps_to_raw_final": [first_step_at_or_below(c, t)
                                   for c, t in zip(curves[label], raw_finals)],
            "steps_to_half_gain": [first_step_at_or_below(c, t)
                                   for c, t in zip(curves[label], halves)],
            "curves": curves[label]}

    def steps(values):
        reached = [v for v in values if v is not None]
        return f"{common.pm(reached, 0)} ({len(reached)}/{len(values)})" if reached else \
            f"not reached (0/{len(values)})"

    rows = [{"method": label, **v} for label, v in per_method.items()]
    columns = [
        ("method", "method"),
        ("val loss", lambda r: common.pm(r["final"])),
        ("gain over raw (paired)", lambda r: "" if r["method"] == "raw"
         else common.pm(r["gain_over_raw"], signed=True)),
        ("gain over its EMA twin (paired)", lambda r: "" if r["gain_over_ema_twin"] is None
         else common.pm(r["gain_over_ema_twin"], signed=True)),
        (f"gain over {ref} (paired)", lambda r: "" if r["method"] in ("raw", ref)
         else common.pm(r["gain_over_ema_every_step"], signed=True)),
        ("steps to raw's final loss (seeds reaching it)", lambda r: steps(r["steps_to_raw_final"])),
        ("steps to half of raw's gain", lambda r: steps(r["steps_to_half_gain"])),
        ("lowest val loss", lambda r: common.pm(r["lowest"]))]
    table = (f"Val loss and gains at the last fine-tuning step ({last}):\n\n"
             + markdown_table(rows, columns))

    shown = [s for s in cfg.report_steps if all(s in c for c in curves["raw"])]
    along = []
    for label in names[1:]:
        if label == ref:
            continue
        along.append({"method": label, "vs": ref, **{
            s: common.pm(common.paired(at(ref, s), at(label, s)), signed=True) for s in shown}})
        if twin(label) not in (None, ref):
            along.append({"method": label, "vs": twin(label), **{
                s: common.pm(common.paired(at(twin(label), s), at(label, s)), signed=True)
                for s in shown}})
    table += ("\n\nGains along the run (the reference's val loss − the method's, paired per "
              "seed; > 0: the method is better):\n\n" + markdown_table(
                  along, [("method", "method"), ("over", "vs")]
                  + [(f"step {s}", s) for s in shown]))
    table += (f"\n\nval loss of θ₀ (the pretrained model) on the poems: "
              f"{common.pm(raw_starts)}. {len(seeds)} seeds; raw weights bitwise identical in "
              f"each seed's two runs: {raw_identical}"
              + (f"; average.py's raw weights vs train.py's, largest difference: "
                 f"{offline_raw_diff:.1e}" if offline_freqs(cfg) else "") + ".")
    results = {"experiment": "bema_finetune", "seeds": seeds, "raw_identical": raw_identical,
               "offline_vs_online_raw_max_abs_diff": offline_raw_diff,
               "update_freqs": cfg.update_freqs, "methods": per_method,
               "pretrain_val_loss_on_poems": raw_starts,
               "runs": [r.command() for r in plan(cfg)]}

    means, spreads, gain_spreads = {}, {}, {}
    for label in names:
        means[label], spreads[label] = common.curve_stats(curves[label])
        diffs = [{t: raw[t] - c[t] for t in c} for raw, c in zip(curves["raw"], curves[label])]
        gain_spreads[label] = common.curve_stats(diffs)[1]
    groups = {f"φ = {f}" + (" (every step)" if f == 1 else ""):
              ["raw", ref] + ([] if f == 1 else [EMA_LABEL.format(f)]) + [BEMA_LABEL.format(f)]
              for f in cfg.update_freqs}
    groups["DEMA, OUEMA (φ = 1)"] = ["raw", ref, *ONLINE_ONLY]
    plot_curves(means, cfg.figure, common.figure_title(
        cfg, f"fine-tuning on Shakespeare's poems from a model pretrained on his plays: batch 4 x "
             f"64 chars, LR 3e-4 constant; val loss (poems) every {cfg.eval_interval} steps; "
             f"BEMA and its EMA twin (bias_power −1) acting every φ steps"),
        xlabel="fine-tuning step", spread=spreads, gain_spread=gain_spreads, unit="nats/char",
        groups=groups)
    return common.write_outputs(cfg, results, table, started)


def smoke_settings(cfg):
    """--smoke=True: a tiny regime that runs every step of the pipeline in seconds."""
    return {"pretrain_iters": 6, "finetune_iters": 8, "eval_interval": 2,
            "update_freqs": [1, 2, 4], "report_steps": [2, 4, 8]}


def run(cfg):
    return common.run_experiment(cfg, plan, analyze, smoke_settings)


if __name__ == "__main__":
    main(BemaFinetuneConfig, run, __doc__)
