"""
Constant LR + cooldown (Hägele et al. 2024, arXiv 2405.18392) on the default character-level
model, each schedule at its own tuned peak LR: WSD vs cosine at equal steps, the four cooldown
shapes, three cooldown lengths, one long constant-LR run with cooldowns branched off it vs a
cosine run per length (and what each costs), and windowed averaging / SWA read off the
constant-LR run vs a real cooldown.

    python -m experiments.wsd_cooldown                   # ~1.5 h on 2 cores
    python -m experiments.wsd_cooldown --smoke=True --seeds=1 --out_dir=/tmp/x

The default recipe otherwise (100 warmup steps, batch 12 x 64, AdamW).
1. LR sweep, per seed (`seeds`, 3) and peak LR (`learning_rates`): one constant-LR run of
   `steps` (2000) steps, a resume checkpoint at every branch point (all kept) and a snapshot
   every 10; 1-sqrt cooldowns to LR 0 over the last 20% branched off it (`--init_from=<ckpt>
   --lr_schedule=wsd --cooldown_start=c`) for runs of T = 500, 1000, 2000 steps; cosine runs
   to LR/10 of T = 500, 1000, 2000 steps. Each schedule's best LR at each T is the one with the
   lowest mean final val loss; the table says whether it lies inside the grid.
2. At the WSD's best LR at the longest T, with `shape_seeds` (5) seeds (the first `seeds` of
   them are the sweep's runs): the shapes linear, cosine and square (20%) and 1-sqrt over 10%
   and 40% at T = 2000, and average.py over the constant run's snapshots: windowed averages
   (`wa`) of 100, 200 and 400 steps and SWA over the second half (from T/2), read at each T.
   Shape and length differences to 1-sqrt 20% come with simultaneous 95% intervals
   (Bonferroni over the comparisons made, Student t over the seeds).
A branch continues the constant run bit for bit, so a branched cooldown is the WSD run of that
length; all runs of a seed see the same batches and are evaluated on the same val batches.

Writes out_dir/{table.md,results.json}, the figure (--figure: the runs at the tuned LRs) and
the LR sweep's figure (--sweep_figure).
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
    sweep_figure: str = "docs/img/wsd_lr_sweep.png"  # final val loss vs peak LR per schedule
    # regime
    lengths: list[int] = field(default_factory=lambda: [500, 1000, 2000])  # run lengths T; the
                                   # constant-LR run is the longest
    learning_rates: list[float] = field(
        default_factory=lambda: [1.25e-3, 2.5e-3, 5e-3, 1e-2, 2e-2])  # peak LRs, swept for WSD
                                   # and cosine at every T (1.25e-3 was added when WSD at
                                   # T = 2000 came out best at 2.5e-3, then the lowest)
    shapes: list[str] = field(default_factory=lambda: ["1-sqrt", "linear", "cosine", "square"])
                                   # cooldown shapes compared at the longest T (20%)
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4])  # 1-sqrt cooldown
                                   # lengths compared at the longest T
    shape_seeds: int = 5           # seeds of the shape, length and averaging comparisons
    shape_lr: float | None = None  # their peak LR; None: WSD's best at the longest T
    eval_iters: int = 50           # val batches per evaluation (the same in every run of a seed)
    confidence: float = 0.95       # of the simultaneous intervals of the shape comparisons

    def __post_init__(self):
        if REFERENCE[0] not in self.shapes or REFERENCE[1] not in self.fractions:
            raise ValueError(f"shapes={self.shapes} and fractions={self.fractions} must include "
                             f"the reference cooldown {REFERENCE[0]!r}, {REFERENCE[1]}")
        if sorted(self.lengths) != self.lengths or len(set(self.lengths)) != len(self.lengths):
            raise ValueError(f"lengths={self.lengths}: give increasing run lengths")
        if sorted(self.learning_rates) != self.learning_rates or not self.learning_rates:
            raise ValueError(f"learning_rates={self.learning_rates}: give increasing peak LRs")

    @property
    def steps(self):
        return self.lengths[-1]


def lengths(cfg):
    return cfg.lengths


def reference_family(cfg):
    """(shape, fraction, T) of the WSD runs: the reference cooldown at every length."""
    return [(*REFERENCE, t) for t in lengths(cfg)]


def comparisons(cfg):
    """(shape, fraction, T) of the other cooldowns, all at the longest T."""
    T = cfg.steps
    return ([(s, REFERENCE[1], T) for s in cfg.shapes if s != REFERENCE[0]]
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
    ckpt = math.gcd(*(cooldown_start(f, t) for _, f, t in reference_family(cfg) +
                      comparisons(cfg)))
    return dict(ckpt=ckpt, snapshot=max(1, s // 200), eval=math.gcd(max(1, s // 20), *cfg.lengths),
                eval_cooldown=max(1, s // 40), eval_average=math.gcd(max(1, s // 8), *cfg.lengths),
                warmup=s // 20)


def run_dir(cfg, lr, seed):
    return Path(cfg.out_dir) / f"lr{lr:g}" / f"s{seed}"


def plan(cfg, shape_lr=None):
    """The LR sweep; with shape_lr, also the shape, length and averaging runs at that LR (the
    sweep's runs at that LR are among them and keep their names, so they are not run twice)."""
    iv = intervals(cfg)
    base = ["config/train_shakespeare_char.py", *common.dataset_args(cfg, "shakespeare_char"),
            "--averaging=", f"--warmup_iters={iv['warmup']}",
            *(common.SMOKE_MODEL if cfg.smoke else []), f"--eval_iters={cfg.eval_iters}"]
    runs = {}

    def add(run):
        runs.setdefault(run.name, run)

    def seed_runs(lr, seed, cooldown_list, cosine, average):
        d, tag = run_dir(cfg, lr, seed), f"lr{lr:g}_s{seed}"
        seeded = base + [f"--learning_rate={lr}", f"--seed={seed}"]
        const = f"{tag}_constant"
        add(common.train_run(const, d / "constant", seeded + [
            "--lr_schedule=constant", "--keep_last=0", f"--ckpt_interval={iv['ckpt']}",
            f"--snapshot_interval={iv['snapshot']}", f"--eval_interval={iv['eval']}"],
            cfg.steps))
        for shape, fraction, T in cooldown_list:
            c = cooldown_start(fraction, T)
            add(common.train_run(f"{tag}_{name(shape, fraction, T)}",
                                 d / name(shape, fraction, T), seeded + [
                f"--init_from={resume_path(d / 'constant', c)}", "--lr_schedule=wsd",
                f"--cooldown_start={c}", f"--cooldown_shape={shape}",
                f"--eval_interval={iv['eval_cooldown']}", f"--ckpt_interval={T}"], T,
                after=[const]))
        for T in (lengths(cfg) if cosine else []):
            add(common.train_run(f"{tag}_cosine_T{T}", d / f"cosine_T{T}", seeded + [
                "--lr_schedule=cosine", f"--min_lr={lr / 10}", f"--eval_interval={iv['eval']}",
                f"--ckpt_interval={T}"], T))
        if average:
            wa = [int(f * cfg.steps) for f in (0.05, 0.1, 0.2)]
            swa = [T // 2 for T in lengths(cfg)]
            add(common.Run(f"{tag}_average", [
                "average.py", f"--ckpt_dir={d / 'constant' / 'snapshots'}",
                f"--out_dir={d / 'constant_averages'}", "--methods=wa,swa",
                f"--wa_horizon={wa}", f"--wa_start={iv['snapshot']}", f"--swa_start={swa}",
                f"--eval_every={iv['eval_average']}", f"--eval_iters={cfg.eval_iters}",
                f"--batch_size={4 if cfg.smoke else 12}", f"--seed={seed}", "--plot=False",
                *([f"--data_dir={cfg.data_dir}"] if cfg.data_dir else [])],
                d / "constant_averages" / "results.json", after=[const]))

    for seed in cfg.seed_values():
        for lr in cfg.learning_rates:
            seed_runs(lr, seed, reference_family(cfg), cosine=True, average=False)
    if shape_lr is not None:
        for seed in shape_seeds(cfg):
            seed_runs(shape_lr, seed, reference_family(cfg) + comparisons(cfg), cosine=False,
                      average=True)
    # the long runs first: they gate the branches and take longest
    return sorted(runs.values(), key=lambda r: (not r.name.endswith("constant"),
                                                not r.name.endswith(f"T{cfg.steps}")))


def shape_seeds(cfg):
    return [common.FIRST_SEED + i for i in range(cfg.shape_seeds)]


def label(shape, fraction, T):
    return f"WSD {shape} {int(100 * fraction)}% T={T}"


def final_losses(cfg, lr, seeds, run, T):
    """The val loss at step T of `run` (a folder of run_dir) for each seed."""
    return [common.evals(run_dir(cfg, lr, seed) / run)[T]["val_loss"] for seed in seeds]


def sweep(cfg):
    """{(schedule, T): {lr: [final val loss per seed]}} of the LR sweep, schedule 'cosine' or
    'WSD'."""
    out = {}
    for T in lengths(cfg):
        for lr in cfg.learning_rates:
            out.setdefault(("cosine", T), {})[lr] = final_losses(
                cfg, lr, cfg.seed_values(), f"cosine_T{T}", T)
            out.setdefault(("WSD", T), {})[lr] = final_losses(
                cfg, lr, cfg.seed_values(), name(*REFERENCE, T), T)
    return out


def best_lr(losses):
    """The LR of the lowest mean loss ({lr: [loss per seed]})."""
    return min(losses, key=lambda lr: common.mean_std(losses[lr])[0])


def tuned_lr(cfg):
    """The shape comparisons' LR: --shape_lr, else WSD's best at the longest T."""
    return cfg.shape_lr if cfg.shape_lr is not None else best_lr(sweep(cfg)[("WSD", cfg.steps)])


def run(cfg):
    """Phase 1, the LR sweep; then phase 2 at the tuned LR; then the analysis."""
    import time
    started = time.perf_counter()
    cfg = common.resolve_paths(cfg)
    if cfg.smoke:
        for key, value in smoke_settings(cfg).items():
            setattr(cfg, key, value)
    common.run_all(plan(cfg), cfg)
    common.run_all(plan(cfg, tuned_lr(cfg)), cfg)
    return analyze(cfg, started)


def analyze(cfg, started):
    T, iv = cfg.steps, intervals(cfg)
    lr_star, seeds = tuned_lr(cfg), shape_seeds(cfg)
    grid = sweep(cfg)
    best = {key: best_lr(losses) for key, losses in grid.items()}
    edge = {key: lr in (cfg.learning_rates[0], cfg.learning_rates[-1]) and
            len(cfg.learning_rates) > 1 for key, lr in best.items()}
    tables = []

    # 1. the LR sweep
    rows = [{"T": t, "schedule": sched, **{lr: grid[(sched, t)][lr] for lr in cfg.learning_rates}}
            for t in lengths(cfg) for sched in ("cosine", "WSD")]

    def cell(r, lr):
        text = common.pm(r[lr])
        return f"**{text}**" if best[(r["schedule"], r["T"])] == lr else text
    tables.append(
        f"Val loss at the end of each run by peak LR (cosine to LR/10; WSD: {REFERENCE[0]} "
        f"over the last {int(100 * REFERENCE[1])}% to 0, branched off the constant-LR run); "
        f"bold: the "
        f"schedule's best at that T:\n\n" + markdown_table(rows, [
            ("steps T", "T"), ("schedule", "schedule"),
            *[(f"LR {lr:g}", lambda r, lr=lr: cell(r, lr)) for lr in cfg.learning_rates],
            ("best inside the grid", lambda r: "no (at its edge)" if edge[(r["schedule"], r["T"])]
             else "yes")]))

    # 2. WSD vs cosine, each at its own best LR (the same seeds: paired)
    vs_rows = []
    for t in lengths(cfg):
        cos, wsd = grid[("cosine", t)][best[("cosine", t)]], grid[("WSD", t)][best[("WSD", t)]]
        const = final_losses(cfg, best[("WSD", t)], cfg.seed_values(), "constant", t)
        vs_rows.append({"T": t, "cos_lr": best[("cosine", t)], "wsd_lr": best[("WSD", t)],
                        "cosine": cos, "wsd": wsd, "diff": common.paired(cos, wsd),
                        "constant": const})
    tables.append(
        "WSD vs cosine, each at its best peak LR of the sweep (the same seeds, so the "
        "difference is paired; choosing the best of the grid on these seeds flatters both "
        "alike):\n\n" + markdown_table(vs_rows, [
            ("steps T", "T"), ("cosine: best LR", lambda r: f"{r['cos_lr']:g}"),
            ("cosine", lambda r: common.pm(r["cosine"])),
            ("WSD: best LR", lambda r: f"{r['wsd_lr']:g}"),
            ("WSD", lambda r: common.pm(r["wsd"])),
            ("cosine − WSD (paired)", lambda r: common.pm(r["diff"], signed=True)),
            ("constant LR at WSD's LR, no cooldown", lambda r: common.pm(r["constant"]))]))
    results = {"experiment": "wsd_cooldown", "seeds": cfg.seed_values(), "shape_seeds": seeds,
               "lengths": lengths(cfg), "learning_rates": cfg.learning_rates,
               "sweep": {f"{s}/T={t}": {f"{lr:g}": v for lr, v in losses.items()}
                         for (s, t), losses in grid.items()},
               "best_lr": {f"{s}/T={t}": lr for (s, t), lr in best.items()},
               "best_lr_at_grid_edge": {f"{s}/T={t}": e for (s, t), e in edge.items()},
               "wsd_vs_cosine": vs_rows, "shape_lr": lr_star}

    # 3. shapes and cooldown lengths at the tuned LR, with simultaneous intervals
    curves, mismatch = {}, 0.0   # label -> per shape seed {step: val loss}
    for seed in seeds:
        d = run_dir(cfg, lr_star, seed)

        def val(run):
            return {s: r["val_loss"] for s, r in common.evals(d / run).items()}

        const = val("constant")
        curves.setdefault("constant LR", []).append(const)
        for shape, fraction, t in reference_family(cfg) + comparisons(cfg):
            curves.setdefault(label(shape, fraction, t), []).append(val(name(shape, fraction, t)))
        rows_avg = common.average_rows(d / "constant_averages")
        for setting in dict.fromkeys(s for s, _ in rows_avg if s != "raw"):
            curves.setdefault(_average_label(setting), []).append(
                {step: loss for (s, step), loss in rows_avg.items() if s == setting})
        # average.py's raw weights, on the same batches, must give train.py's numbers
        mismatch = max([mismatch] + [abs(loss - const[step]) for (s, step), loss in
                                     rows_avg.items() if s == "raw" and step in const])
    results["average_vs_train_raw_max_abs_diff"] = mismatch

    def at(key, step):
        return [c[step] for c in curves[key]]

    reference = {t: label(*REFERENCE, t) for t in lengths(cfg)}
    ref = at(reference[T], T)
    others = comparisons(cfg)
    m = len(others)
    t_crit = common.t_critical((1 - cfg.confidence) / m, len(seeds) - 1)

    def interval(diffs):
        mean, std = common.mean_std(diffs)
        half = t_crit * std / math.sqrt(len(diffs))
        return mean - half, mean + half

    compare_rows = [{"shape": s, "fraction": f, "loss": at(label(s, f, T), T)}
                    for s, f, _ in [(*REFERENCE, T)] + others]
    for r in compare_rows:
        if (r["shape"], r["fraction"]) != REFERENCE:
            r["diff"] = common.paired(r["loss"], ref)
            r["interval"] = interval(r["diff"])
    name_ref = f"{REFERENCE[0]} over the last {int(100 * REFERENCE[1])}%"
    within = max(max(abs(a), abs(b)) for r in compare_rows if "interval" in r
                 for a, b in [r["interval"]])
    tables.append(
        f"Cooldown shapes and lengths at T = {T} steps, peak LR {lr_star:g} (WSD's best at T "
        f"= {T}), {len(seeds)} seeds: each − {name_ref} (paired), and its simultaneous "
        f"{100 * cfg.confidence:g}% interval over the {m} comparisons (Bonferroni, Student t "
        f"with {len(seeds) - 1} degrees of freedom):\n\n" + markdown_table(compare_rows, [
            ("cooldown", lambda r: f"{r['shape']}, {int(100 * r['fraction'])}% "
                                   f"({int(r['fraction'] * T)} steps)"),
            ("val loss", lambda r: common.pm(r["loss"])),
            (f"− {name_ref} (paired)", lambda r: common.pm(r["diff"], signed=True)
             if "diff" in r else ""),
            (f"{100 * cfg.confidence:g}% simultaneous interval", lambda r:
             f"[{r['interval'][0]:+.4f}, {r['interval'][1]:+.4f}]" if "interval" in r else "")])
        + f"\n\nEvery interval lies within ±{within:.4f} of 0.")
    results["shapes"] = compare_rows
    results["shape_comparisons_within"] = within

    # 4. compute: one constant run + branched cooldowns vs a cosine run per length
    config = common.read_json(run_dir(cfg, lr_star, seeds[0]) / "constant" / "config.json")
    tokens = config["batch_size"] * config["block_size"] * config["gradient_accumulation_steps"]
    last_branch = max(cooldown_start(REFERENCE[1], t) for t in lengths(cfg))
    family_steps = last_branch + sum(t - cooldown_start(REFERENCE[1], t) for t in lengths(cfg))
    cosine_steps = sum(lengths(cfg))
    results["compute"] = {"branched_family_steps": family_steps,
                          "cosine_runs_steps": cosine_steps}
    results["tokens_per_step"] = tokens
    tables.append(
        f"Compute for one model at each of T = {', '.join(map(str, lengths(cfg)))} steps: a "
        f"constant-LR run to step {last_branch} plus the {len(lengths(cfg))} cooldowns = "
        f"{family_steps:,} steps ({family_steps * tokens:,} training tokens); a cosine run per "
        f"length = {cosine_steps:,} steps ({cosine_steps * tokens:,} tokens), "
        f"{cosine_steps / family_steps:.2f}x as many. Their losses are those of the second "
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
    cols.append(("WSD cooldown: gain", lambda r: common.pm(
        common.paired(r["constant"], r["cooldown"]), signed=True)))
    tables.append(f"Averages of the constant-LR run at peak LR {lr_star:g} read off at step T (no "
                  "extra training; `wa H`: the last finished window of H steps) vs the cooldown "
                  f"branched off it that ends at T ({name_ref}); gain = constant-LR val loss − "
                  f"val loss, paired per seed, {len(seeds)} seeds:\n\n"
                  + markdown_table(avg_rows, cols))
    results["averages_vs_cooldown"] = avg_rows

    table = "\n\n".join(tables) + (
        f"\n\nLR sweep: {len(cfg.seed_values())} seeds; shapes, lengths and averages: "
        f"{len(seeds)} seeds; val loss on {cfg.eval_iters} val batches per seed, the same for "
        f"every run of a seed.")
    results["curves"] = curves
    results["runs"] = [r.command() for r in plan(cfg, lr_star)]

    # figure 1: the LR sweep, final loss vs peak LR per T, cosine − WSD below
    sweep_curves, sweep_spread, sweep_ref, sweep_gain_spread = {}, {}, {}, {}
    sweep_groups = {}
    for t in lengths(cfg):
        for sched in ("cosine", "WSD"):
            key = f"{sched} T={t}"
            sweep_curves[key] = [(lr, common.mean_std(v)[0]) for lr, v in grid[(sched, t)].items()]
            sweep_spread[key] = [(lr, common.mean_std(v)[1]) for lr, v in grid[(sched, t)].items()
                                 if len(v) > 1]
        sweep_ref[f"cosine T={t}"] = f"cosine T={t}"
        sweep_ref[f"WSD T={t}"] = f"cosine T={t}"
        sweep_gain_spread[f"WSD T={t}"] = [
            (lr, common.mean_std(common.paired(grid[("cosine", t)][lr], grid[("WSD", t)][lr]))[1])
            for lr in cfg.learning_rates if len(cfg.seed_values()) > 1]
        sweep_groups[f"T = {t} steps"] = [f"cosine T={t}", f"WSD T={t}"]
    plot_curves(sweep_curves, cfg.sweep_figure, common.figure_title(
        cfg, f"default char model: final val loss vs peak LR, cosine (to LR/10) and WSD "
             f"({name_ref}, to 0), runs of T steps"),
        xlabel="peak learning rate", ylabel="final val loss", reference=sweep_ref,
        spread=sweep_spread, gain_spread=sweep_gain_spread, unit="nats/char",
        groups=sweep_groups, xscale="log")

    # figure 2: the runs, small multiples
    means, spreads, gain_spreads, refs, groups = {}, {}, {}, {}, {}

    def add(key, per_seed, base, base_key):
        means[key], spreads[key] = common.curve_stats(per_seed)
        refs[key] = base_key
        if key != base_key:
            diffs = [{s: c0[s] - c[s] for s in c if s in c0} for c0, c in zip(base, per_seed)]
            gain_spreads[key] = common.curve_stats(diffs)[1]

    for t in lengths(cfg):
        lr_w, lr_c = best[("WSD", t)], best[("cosine", t)]
        const_key = f"constant LR {lr_w:g}"
        base = [{s: r["val_loss"] for s, r in common.evals(run_dir(cfg, lr_w, seed) /
                                                           "constant").items()}
                for seed in cfg.seed_values()]
        add(const_key, base, base, const_key)
        wsd_key, cos_key = f"WSD T={t}, LR {lr_w:g}", f"cosine T={t}, LR {lr_c:g}"
        add(wsd_key, [{s: r["val_loss"] for s, r in common.evals(
            run_dir(cfg, lr_w, seed) / name(*REFERENCE, t)).items()}
            for seed in cfg.seed_values()], base, const_key)
        add(cos_key, [{s: r["val_loss"] for s, r in common.evals(
            run_dir(cfg, lr_c, seed) / f"cosine_T{t}").items()}
            for seed in cfg.seed_values()], base, const_key)
        groups[f"T = {t}: each at its best LR"] = [const_key, wsd_key, cos_key]
    const_star = f"constant LR {lr_star:g}, {len(seeds)} seeds"
    add(const_star, curves["constant LR"], curves["constant LR"], const_star)
    for s, f, t in [(*REFERENCE, T)] + others:
        add(f"{label(s, f, t)}, LR {lr_star:g}", curves[label(s, f, t)], curves["constant LR"],
            const_star)
    shape_keys = [f"{label(s, REFERENCE[1], T)}, LR {lr_star:g}" for s in cfg.shapes]
    groups[f"shapes (20%), T = {T}, LR {lr_star:g}"] = [const_star, *shape_keys]
    groups[f"cooldown lengths ({REFERENCE[0]}), T = {T}"] = [const_star] + [
        f"{label(REFERENCE[0], f, T)}, LR {lr_star:g}" for f in cfg.fractions]
    for k in windows + [f"swa from {T // 2}"]:
        add(k, curves[k], curves["constant LR"], const_star)
    groups[f"averages of the constant run, LR {lr_star:g}"] = [
        const_star, *windows, f"swa from {T // 2}", f"{label(*REFERENCE, T)}, LR {lr_star:g}"]
    plot_curves(means, cfg.figure, common.figure_title(
        cfg, f"default char model: constant-LR runs, WSD cooldowns branched off them (to 0), "
             f"cosine runs (to LR/10), averages of the constant run; val loss every "
             f"{iv['eval']} steps ({iv['eval_cooldown']} in cooldowns)"),
        reference=refs, spread=spreads, gain_spread=gain_spreads, unit="nats/char",
        groups=groups)
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
            "eval_iters": 2, "shape_seeds": max(2, min(cfg.shape_seeds, cfg.seeds))}


if __name__ == "__main__":
    main(WsdCooldownConfig, run, __doc__)
