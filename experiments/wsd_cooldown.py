"""
Constant LR + cooldown (Hägele et al. 2024, arXiv 2405.18392) on the default character-level
model: WSD vs cosine at equal steps, the four cooldown shapes, three cooldown lengths, one long
constant-LR run with cooldowns branched off it vs a cosine run per length (and what each costs),
and windowed averaging / SWA read off the constant-LR run vs a real cooldown.

    python -m experiments.wsd_cooldown                   # ~30 min on 2 cores
    python -m experiments.wsd_cooldown --smoke=True --seeds=1 --out_dir=/tmp/x

Per seed (the default recipe otherwise: peak LR 1e-3, 100 warmup steps, batch 12 x 64):
- one constant-LR run of `steps` (2000) steps, a resume checkpoint every 200 steps (all kept)
  and a snapshot every 10;
- cooldowns branched off its checkpoints (`--init_from=<ckpt> --lr_schedule=wsd
  --cooldown_start=c`, to LR 0): 1-sqrt over the last 20% of runs of T = 500, 1000, 2000 steps;
  at T = 2000 also the shapes linear, cosine and square (20%) and 1-sqrt over 10% and 40%;
- cosine runs (to 1e-4, the default recipe's 10%) of T = 500, 1000, 2000 steps;
- average.py over the constant run's snapshots: windowed averages (`wa`) of 100, 200 and 400
  steps and SWA over the second half (from T/2), read at each T.
A branch continues the constant run bit for bit, so a branched cooldown is the WSD run of that
length; all runs of a seed see the same batches and are evaluated on the same val batches.

Writes out_dir/{table.md,results.json} and the figure (--figure).
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

from experiments import common
from wagpt.checkpoint import resume_path
from wagpt.configurator import main
from wagpt.report import markdown_table, plot_curves

REFERENCE = ("1-sqrt", 0.2)   # the cooldown of the WSD runs: Hägele et al.'s best shape, 20%


@dataclass
class WsdCooldownConfig(common.ExperimentConfig):
    out_dir: str = "out/experiments/wsd_cooldown"
    figure: str = "docs/img/wsd_cooldown.png"
    # regime
    lengths: list[int] = field(default_factory=lambda: [500, 1000, 2000])  # run lengths T; the
                                   # constant-LR run is the longest
    shapes: list[str] = field(default_factory=lambda: ["1-sqrt", "linear", "cosine", "square"])
                                   # cooldown shapes compared at the longest T (20%)
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4])  # 1-sqrt cooldown
                                   # lengths compared at the longest T
    eval_iters: int = 50           # val batches per evaluation (the same in every run of a seed)

    def __post_init__(self):
        if REFERENCE[0] not in self.shapes or REFERENCE[1] not in self.fractions:
            raise ValueError(f"shapes={self.shapes} and fractions={self.fractions} must include "
                             f"the reference cooldown {REFERENCE[0]!r}, {REFERENCE[1]}")
        if sorted(self.lengths) != self.lengths or len(set(self.lengths)) != len(self.lengths):
            raise ValueError(f"lengths={self.lengths}: give increasing run lengths")

    @property
    def steps(self):
        return self.lengths[-1]


def lengths(cfg):
    return cfg.lengths


def cooldowns(cfg):
    """(shape, fraction, T) of every branched cooldown: the reference cooldown at every length,
    the other shapes and fractions at the longest."""
    T = cfg.steps
    family = [(*REFERENCE, t) for t in lengths(cfg)]
    return (family + [(s, REFERENCE[1], T) for s in cfg.shapes if s != REFERENCE[0]]
            + [(REFERENCE[0], f, T) for f in cfg.fractions if f != REFERENCE[1]])


def cooldown_start(fraction, T):
    return T - int(fraction * T)   # as schedules.py: int(cooldown_frac * max_iters) steps


def name(shape, fraction, T):
    return f"wsd_{shape}_{int(100 * fraction)}pct_T{T}"


def intervals(cfg):
    """Resume checkpoints of the constant run at every branch point (their gcd), and the
    snapshot, eval (constant/cosine), eval (cooldowns), eval (averages) intervals and warmup,
    scaled with the longest T (2000: 10, 100, 50, 250, 100)."""
    s = cfg.steps
    ckpt = math.gcd(*(cooldown_start(f, t) for _, f, t in cooldowns(cfg)))
    return dict(ckpt=ckpt, snapshot=max(1, s // 200), eval=math.gcd(max(1, s // 20), *cfg.lengths),
                eval_cooldown=max(1, s // 40), eval_average=math.gcd(max(1, s // 8), *cfg.lengths),
                warmup=s // 20)


def plan(cfg):
    out, iv = Path(cfg.out_dir), intervals(cfg)
    base = ["config/train_shakespeare_char.py", *common.dataset_args(cfg, "shakespeare_char"),
            "--averaging=", f"--warmup_iters={iv['warmup']}", f"--eval_iters={cfg.eval_iters}",
            *(common.SMOKE_MODEL if cfg.smoke else [])]
    if cfg.smoke:
        base.append(f"--eval_iters={cfg.eval_iters}")   # after SMOKE_MODEL's
    runs = []
    for seed in cfg.seed_values():
        d = out / f"s{seed}"
        seeded = base + [f"--seed={seed}"]
        const = f"s{seed}_constant"
        runs.append(common.train_run(const, d / "constant", seeded + [
            "--lr_schedule=constant", "--keep_last=0", f"--ckpt_interval={iv['ckpt']}",
            f"--snapshot_interval={iv['snapshot']}", f"--eval_interval={iv['eval']}"],
            cfg.steps))
        for shape, fraction, T in cooldowns(cfg):
            c = cooldown_start(fraction, T)
            runs.append(common.train_run(f"s{seed}_{name(shape, fraction, T)}",
                                         d / name(shape, fraction, T), seeded + [
                f"--init_from={resume_path(d / 'constant', c)}", "--lr_schedule=wsd",
                f"--cooldown_start={c}", f"--cooldown_shape={shape}",
                f"--eval_interval={iv['eval_cooldown']}", f"--ckpt_interval={T}"], T,
                after=[const]))
        for T in lengths(cfg):
            runs.append(common.train_run(f"s{seed}_cosine_T{T}", d / f"cosine_T{T}", seeded + [
                "--lr_schedule=cosine", "--min_lr=1e-4", f"--eval_interval={iv['eval']}",
                f"--ckpt_interval={T}"], T))
        wa = [int(f * cfg.steps) for f in (0.05, 0.1, 0.2)]
        swa = [T // 2 for T in lengths(cfg)]
        runs.append(common.Run(f"s{seed}_average", [
            "average.py", f"--ckpt_dir={d / 'constant' / 'snapshots'}",
            f"--out_dir={d / 'constant_averages'}", "--methods=wa,swa",
            f"--wa_horizon={wa}", f"--wa_start={iv['snapshot']}", f"--swa_start={swa}",
            f"--eval_every={iv['eval_average']}", f"--eval_iters={cfg.eval_iters}",
            f"--batch_size={4 if cfg.smoke else 12}", f"--seed={seed}", "--plot=False",
            *([f"--data_dir={cfg.data_dir}"] if cfg.data_dir else [])],
            d / "constant_averages" / "results.json", after=[const]))
    # the long runs first: they gate the branches and take longest
    return sorted(runs, key=lambda r: (not r.name.endswith("constant"),
                                       not r.name.endswith(f"T{cfg.steps}")))


def label(shape, fraction, T):
    return f"WSD {shape} {int(100 * fraction)}% T={T}"


def analyze(cfg, started):
    out, seeds, T = Path(cfg.out_dir), cfg.seed_values(), cfg.steps
    iv = intervals(cfg)
    curves, mismatch = {}, 0.0   # label -> per seed {step: val loss}
    for seed in seeds:
        d = out / f"s{seed}"

        def add(key, curve):
            curves.setdefault(key, []).append(curve)

        def val(run):
            return {s: r["val_loss"] for s, r in common.evals(d / run).items()}

        const = val("constant")
        add("constant LR", const)
        for shape, fraction, t in cooldowns(cfg):
            add(label(shape, fraction, t), val(name(shape, fraction, t)))
        for t in lengths(cfg):
            add(f"cosine T={t}", val(f"cosine_T{t}"))
        rows = common.average_rows(d / "constant_averages")
        for setting in dict.fromkeys(s for s, _ in rows if s != "raw"):
            add(_average_label(setting), {step: loss for (s, step), loss in rows.items()
                                          if s == setting})
        # average.py's raw weights, on the same batches, must give train.py's numbers
        mismatch = max([mismatch] + [abs(loss - const[step]) for (s, step), loss in rows.items()
                                     if s == "raw" and step in const])

    def at(key, step):
        return [c[step] for c in curves[key]]

    config = common.read_json(out / f"s{seeds[0]}" / "constant" / "config.json")
    tokens = config["batch_size"] * config["block_size"] * config["gradient_accumulation_steps"]
    results = {"experiment": "wsd_cooldown", "seeds": seeds, "lengths": lengths(cfg),
               "average_vs_train_raw_max_abs_diff": mismatch, "tokens_per_step": tokens}
    reference = {t: label(*REFERENCE, t) for t in lengths(cfg)}
    name_ref = f"{REFERENCE[0]} over the last {int(100 * REFERENCE[1])}%"
    tables = []

    # 1. WSD vs cosine at equal steps
    rows = [{"T": t, "cosine": at(f"cosine T={t}", t), "wsd": at(reference[t], t),
             "constant": at("constant LR", t)} for t in lengths(cfg)]
    tables.append(f"WSD ({name_ref}, branched off the constant-LR run) vs cosine (to 1e-4), "
                  f"same steps and batches:\n\n" + markdown_table(rows, [
                      ("steps T", "T"), ("cosine", lambda r: common.pm(r["cosine"])),
                      ("WSD", lambda r: common.pm(r["wsd"])),
                      ("cosine − WSD (paired)", lambda r: common.pm(
                          common.paired(r["cosine"], r["wsd"]), signed=True)),
                      ("constant LR, no cooldown", lambda r: common.pm(r["constant"]))]))
    results["wsd_vs_cosine"] = rows

    # 2. shapes and 3. cooldown lengths, at the longest T
    ref = at(reference[T], T)
    shape_rows = [{"shape": s, "loss": at(label(s, REFERENCE[1], T), T)} for s in cfg.shapes]
    tables.append(f"Cooldown shapes over the last {int(100 * REFERENCE[1])}% of T = {T} steps:"
                  f"\n\n" + markdown_table(shape_rows, [
                      ("shape", "shape"), ("val loss", lambda r: common.pm(r["loss"])),
                      (f"shape − {REFERENCE[0]} (paired)", lambda r: "" if r["shape"] ==
                       REFERENCE[0] else common.pm(common.paired(r["loss"], ref), signed=True))]))
    fraction_rows = [{"fraction": f, "loss": at(label(REFERENCE[0], f, T), T)}
                     for f in cfg.fractions]
    tables.append(f"Cooldown length, {REFERENCE[0]}, T = {T} steps:\n\n" + markdown_table(
        fraction_rows, [
            ("cooldown", lambda r: f"{int(100 * r['fraction'])}% ({int(r['fraction'] * T)} "
                                   f"steps)"),
            ("val loss", lambda r: common.pm(r["loss"])),
            (f"− {int(100 * REFERENCE[1])}% (paired)", lambda r: "" if r["fraction"] ==
             REFERENCE[1] else common.pm(common.paired(r["loss"], ref), signed=True))]))
    results["shapes"], results["fractions"] = shape_rows, fraction_rows

    # 4. compute: one constant run + branched cooldowns vs a cosine run per length
    last_branch = max(cooldown_start(REFERENCE[1], t) for t in lengths(cfg))
    family_steps = last_branch + sum(t - cooldown_start(REFERENCE[1], t) for t in lengths(cfg))
    cosine_steps = sum(lengths(cfg))
    results["compute"] = {"branched_family_steps": family_steps,
                          "cosine_runs_steps": cosine_steps}
    tables.append(
        f"Compute for one model at each of T = {', '.join(map(str, lengths(cfg)))} steps: a "
        f"constant-LR run to step {last_branch} plus the {len(lengths(cfg))} cooldowns = "
        f"{family_steps:,} steps ({family_steps * tokens:,} training tokens); a cosine run per "
        f"length = {cosine_steps:,} steps ({cosine_steps * tokens:,} tokens), "
        f"{cosine_steps / family_steps:.2f}x as many. Their losses are those of the first "
        f"table.")

    # 5. averages of the constant-LR run vs a real cooldown ending at the same step
    windows = sorted((k for k in curves if k.startswith("wa ")), key=lambda k: int(k[5:]))
    avg_rows = [{"T": t, "constant": at("constant LR", t), "cooldown": at(reference[t], t),
                 "swa": at(f"swa from {t // 2}", t), **{k: at(k, t) for k in windows}}
                for t in lengths(cfg)]
    cols = [("step T", "T"), ("constant LR", lambda r: common.pm(r["constant"]))]
    for k in windows + ["swa"]:
        cols.append((f"{'SWA from T/2' if k == 'swa' else k}: gain", lambda r, k=k: common.pm(
            common.paired(r["constant"], r[k]), signed=True)))
    cols.append((f"WSD cooldown: gain", lambda r: common.pm(
        common.paired(r["constant"], r["cooldown"]), signed=True)))
    tables.append("Averages of the constant-LR run read off at step T (no extra training; `wa "
                  "H`: the last finished window of H steps) vs the cooldown branched off it "
                  f"that ends at T ({name_ref}); gain = constant-LR val loss − val loss, paired "
                  "per seed:\n\n" + markdown_table(avg_rows, cols))
    results["averages_vs_cooldown"] = avg_rows

    table = "\n\n".join(tables) + (f"\n\n{len(seeds)} seeds; val loss on {cfg.eval_iters} val "
                                    f"batches per seed, the same for every run of a seed.")
    results["curves"] = curves

    plotted = ["constant LR", windows[len(windows) // 2]]
    plotted += [f"cosine T={t}" for t in lengths(cfg)] + list(reference.values())
    plotted += [label(s, REFERENCE[1], T) for s in cfg.shapes if s != REFERENCE[0]]
    plotted += [label(REFERENCE[0], f, T) for f in cfg.fractions if f != REFERENCE[1]]
    means, spreads, gain_spreads = {}, {}, {}
    for key in plotted:
        means[key], spreads[key] = common.curve_stats(curves[key])
        diffs = [{s: c0[s] - c[s] for s in c if s in c0}
                 for c0, c in zip(curves["constant LR"], curves[key])]
        gain_spreads[key] = common.curve_stats(diffs)[1]
    plot_curves(means, cfg.figure, common.figure_title(
        cfg, f"default char model, peak LR {config['learning_rate']:g}: a constant-LR run, "
             f"cooldowns branched off it (WSD, to 0), cosine runs (to 1e-4), a windowed average "
             f"of the constant run;\nval loss every {iv['eval']} steps ({iv['eval_cooldown']} in "
             f"cooldowns)"),
        spread=spreads, gain_spread=gain_spreads)
    return common.write_outputs(cfg, results, table, started)


def _average_label(setting):
    """average.py's setting label -> a short one: 'wa[wa_horizon=200]' -> 'wa H=200'."""
    if setting.startswith("wa"):
        return "wa H=" + setting.split("wa_horizon=")[1].rstrip("]")
    if setting.startswith("swa"):
        return "swa from " + setting.split("swa_start=")[1].rstrip("]")
    return setting


def smoke_settings(cfg):
    """--smoke=True: a tiny regime that runs every step of the pipeline in seconds."""
    return {"lengths": [max(1, n // 100) for n in cfg.lengths],   # 5, 10, 20
            "eval_iters": 2}


def run(cfg):
    return common.run_experiment(cfg, plan, analyze, smoke_settings)


if __name__ == "__main__":
    main(WsdCooldownConfig, run, __doc__)
