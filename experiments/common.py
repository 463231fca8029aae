"""
What the experiment scripts share: their config keys, the runs of the entry points as
subprocesses (N at a time, one thread each; a run whose outputs are complete is skipped, an
interrupted training run continues from its last resume checkpoint, so a crashed experiment
picks up where it stopped), the numbers the runs write, means ± std over seeds and paired
differences, and the outputs: table.md, results.json and the figure (report.py's plot_curves).

Every run is a command a user could type (`python train.py ... --out_dir=...`, run from the
repository root); its output goes to <experiment out_dir>/logs/<run>.log and its wall time to
runs.jsonl beside it. The experiments are in docs/results.md.
"""

import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from wagpt import checkpoint
from wagpt.atomic import atomic_write
from wagpt.errors import ConfigError
from wagpt.report import append_jsonl, format_duration
from wagpt.run_dir import read_metrics

REPO = Path(__file__).resolve().parents[1]

FIRST_SEED = 1337   # train.py's default: seed 1 of every experiment is the default run's seed


@dataclass
class ExperimentConfig:
    # experiment
    out_dir: str = "out/experiments/x"  # runs, logs, table.md, results.json
    figure: str = "docs/img/x.png"  # where --publish puts the figure (docs/ shows it); without
                                   # --publish it goes to out_dir under the same name
    publish: bool = False          # write the figures to their places in docs/img (not with
                                   # --smoke=True); a figure key given explicitly is kept
    seeds: int = 3                 # seeds 1337, 1338, ...: init, batches, eval batches of a run
    parallel: int = 2              # runs at a time ...
    threads: int = 1               # ... each with this many threads (small models: 1 is fastest)
    smoke: bool = False            # a tiny model for a few steps: checks the pipeline in seconds
    data_dir: str | None = None    # another prepared dataset instead of the experiment's (tests)

    def seed_values(self):
        return [FIRST_SEED + i for i in range(self.seeds)]


# a 1-layer, 16-wide model on 16-token contexts: what --smoke=True trains
SMOKE_MODEL = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4",
               "--eval_iters=2", "--log_interval=1"]


def is_figure_key(key):
    return key == "figure" or key.endswith("_figure")


def figure_paths(cfg):
    """Where the figures go: into out_dir under their published names unless --publish (docs/img)
    or the key was given explicitly. A smoke test is never published."""
    publish = getattr(cfg, "publish", False)
    if publish and getattr(cfg, "smoke", False):
        raise ConfigError("publish=True with smoke=True: a smoke test's figure would replace the "
                         "published one; drop --publish")
    if publish:
        return cfg
    given = getattr(cfg, "given_keys", frozenset())
    for key, value in vars(cfg).items():
        if is_figure_key(key) and isinstance(value, str) and key not in given:
            setattr(cfg, key, str(Path(cfg.out_dir) / Path(value).name))
    return cfg


def resolve_paths(cfg):
    """cfg with out_dir, the figures (figure_paths) and every *data_dir made absolute (against
    the current folder): the runs start in the repository root, wherever the experiment was
    started."""
    for key, value in vars(cfg).items():
        if isinstance(value, str) and (key == "out_dir" or is_figure_key(key)
                                       or key.endswith("data_dir")):
            setattr(cfg, key, str(Path(value).resolve()))
    return figure_paths(cfg)


def run_experiment(cfg, plan, analyze, smoke_settings):
    """An experiment's command: paths made absolute, `smoke_settings(cfg)` ({key: value}) applied
    when cfg.smoke, every run of `plan(cfg)` not done yet run, then `analyze(cfg, started)`."""
    started = time.perf_counter()
    cfg = resolve_paths(cfg)
    if cfg.smoke:
        for key, value in smoke_settings(cfg).items():
            setattr(cfg, key, value)
    run_all(plan(cfg), cfg)
    return analyze(cfg, started)


def dataset_args(cfg, dataset):
    """--dataset=<name>, or --data_dir=<cfg.data_dir> where the config overrides the data."""
    return [f"--data_dir={cfg.data_dir}"] if cfg.data_dir else [f"--dataset={dataset}"]


# ---------------------------------------------------------------------------------------------
# runs

@dataclass
class Run:
    """One command of an experiment. `done` is the file that exists once it has finished (a
    training run's last resume checkpoint, eval_ckpt.py's --out_json, average.py's
    results.json); a training run names its `train_dir` so that an interrupted run continues
    from its newest resume checkpoint instead of starting over."""
    name: str
    argv: list                     # script and arguments, e.g. ["train.py", "--max_iters=100"]
    done: Path
    after: tuple = ()              # names of runs that must have finished first
    train_dir: Path | None = None
    prepare: object = field(default=None, compare=False)   # called just before the command
                                   # starts, once its `after` runs are done (e.g. link_files)
    wall_s: float | None = field(default=None, compare=False)

    def command(self):
        return " ".join(["python", *self.argv])


def train_run(name, out_dir, args, max_iters, after=()):
    """A train.py run into out_dir that ends at step max_iters, without post-hoc EMA profiles
    (no experiment here reads them but posthoc_validation.py, which trains in-process; they would
    triple the disk of every run with snapshots)."""
    out_dir = Path(out_dir)
    return Run(name, ["train.py", *args, "--posthoc_sigma_rel=None", f"--max_iters={max_iters}",
                      f"--out_dir={out_dir}"],
               checkpoint.resume_path(out_dir, max_iters), tuple(after), train_dir=out_dir)


class RunFailed(RuntimeError):
    pass


def run_all(runs, cfg):
    """Run `runs` (in list order, as their dependencies allow), cfg.parallel at a time with
    OMP_NUM_THREADS=cfg.threads; skip those already done. Raises RunFailed naming the runs that
    failed and their logs once every run that could go has gone."""
    exp_dir = Path(cfg.out_dir)
    (exp_dir / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads), "MKL_NUM_THREADS": str(cfg.threads)}
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names repeat: {sorted(n for n in names if names.count(n) > 1)}")
    finished = {r.name for r in runs if r.done.exists()}
    pending = [r for r in runs if r.name not in finished]
    if finished:
        print(f"{len(finished)} of {len(runs)} runs already done, skipped")
    running, failed, started = {}, [], time.perf_counter()
    total = len(pending)
    while pending or running:
        for run in list(pending):
            if len(running) >= cfg.parallel:
                break
            if any(a in failed for a in run.after):
                failed.append(run.name)
                pending.remove(run)
                print(f"  not run: {run.name} (needs {', '.join(run.after)})")
            elif all(a in finished for a in run.after):
                pending.remove(run)
                running[run.name] = (run, *_start(run, exp_dir, env))
        time.sleep(0.2)
        for name, (run, process, log, t0) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            run.wall_s = time.perf_counter() - t0
            ok = process.returncode == 0 and run.done.exists()
            (finished.add if ok else failed.append)(name)
            append_jsonl(exp_dir / "runs.jsonl", {
                "run": name, "command": run.command(), "wall_s": round(run.wall_s, 1),
                "ok": ok, "returncode": process.returncode,
                "finished": datetime.datetime.now().isoformat(timespec="seconds")})
            done = total - len(pending) - len(running)
            print(f"  [{done}/{total}] {'done' if ok else 'FAILED'}: {name} in "
                  f"{format_duration(run.wall_s)} ({format_duration(time.perf_counter() - started)}"
                  f" elapsed)")
    if failed:
        logs = ", ".join(str(exp_dir / "logs" / f"{n}.log") for n in failed)
        raise RunFailed(f"{len(failed)} run(s) failed or could not run: {', '.join(failed)}; "
                        f"see {logs}")


def _start(run, exp_dir, env):
    if run.prepare is not None:
        run.prepare()
    argv = list(run.argv)
    if run.train_dir is not None and checkpoint.latest_resume(run.train_dir) is not None:
        argv.append("--init_from=resume")   # an interrupted run continues exactly where it was
    elif run.train_dir is not None and run.train_dir.exists():
        # no resume checkpoint: the run died before its first one; start it again
        _remove_inside(run.train_dir, exp_dir)
    log = open(exp_dir / "logs" / f"{run.name}.log", "w")
    log.write(f"$ python {' '.join(argv)}\n")
    log.flush()
    print(f"  start: {run.name}")
    process = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    return process, log, time.perf_counter()


def link_files(directory, files):
    """`directory` holding a relative symbolic link to each of `files` (replacing what it held):
    a trajectory for average.py made of snapshots that live in several runs, e.g. the pretrained
    θ₀ and the fine-tuning run's snapshots after it."""
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for f in files:
        f = Path(f).resolve()
        (directory / f.name).symlink_to(os.path.relpath(f, directory.resolve()))
    return directory


def _remove_inside(path, exp_dir):
    path, exp_dir = Path(path).resolve(), Path(exp_dir).resolve()
    if exp_dir not in path.parents:   # only ever a run folder this experiment made
        raise RunFailed(f"{path} is not inside {exp_dir}; remove it yourself")
    shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------
# what the runs wrote

def evals(out_dir):
    """{step: eval record} of a training run's metrics.jsonl (val_loss/raw, val_loss/<method>)."""
    return {r["iter"]: r for r in read_metrics(Path(out_dir) / "metrics.jsonl")
            if "val_loss" in r}


def average_rows(out_dir):
    """{(setting label, step): val loss} of an average.py out_dir."""
    rows = json.loads((Path(out_dir) / "results.json").read_text())["rows"]
    return {(r["setting"], r["step"]): r["val_loss"] for r in rows}


def read_json(path):
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------
# statistics over seeds

def mean_std(values):
    """(mean, sample std) of finite values; std is nan for one value, both nan for none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def pm(values, digits=4, signed=False):
    """'1.2345 ± 0.0012' over seeds ('1.2345' for one seed)."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if math.isnan(std) else f"{text} ± {std:.{digits}f}"


def t_two_sided(t, df):
    """P(|T| <= t) for Student's t with df (a positive integer) degrees of freedom, in closed
    form (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, total, term = math.cos(theta) ** 2, 0.0, 1.0
    if df % 2:   # odd: (2/π)(θ + sin θ cos θ (1 + 2/3 cos²θ + ... ))
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    for k in range(1, df // 2 + 1):   # even: sin θ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ...)
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * total


def t_critical(alpha, df):
    """The t with P(|T| > t) = alpha (two-sided), df degrees of freedom: the half-width of a
    (1 − alpha) interval of a mean is t_critical(alpha, n − 1) · std / sqrt(n). For m
    simultaneous intervals (Bonferroni) use alpha / m."""
    if not (0 < alpha < 1 and df >= 1):
        raise ValueError(f"alpha={alpha}, df={df}: need 0 < alpha < 1 and df >= 1")
    lo, hi = 0.0, 1.0
    while 1 - t_two_sided(hi, df) > alpha:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 - t_two_sided(mid, df) > alpha else (lo, mid)
    return (lo + hi) / 2


def paired(a, b):
    """a − b per seed (lists in the same seed order)."""
    return [x - y for x, y in zip(a, b, strict=True)]


def curve_stats(per_seed):
    """[{x: y}] per seed -> ([(x, mean)], [(x, std)]) over the x every seed has."""
    common = sorted(set.intersection(*(set(c) for c in per_seed)))
    stats = [(x, mean_std([c[x] for c in per_seed])) for x in common]
    return [(x, m) for x, (m, _) in stats], [(x, s) for x, (_, s) in stats
                                              if not math.isnan(s)]


# ---------------------------------------------------------------------------------------------
# outputs

def machine():
    """The machine in words, for results.json: '2-core x86_64, Linux, torch 2.13.0+cpu'."""
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()}-core {platform.machine()}, {platform.system()}, {device}, "
            f"torch {torch.__version__}")


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_outputs(cfg, results, table, started):
    """out_dir/results.json (the numbers, the commands, the config, date, machine, wall time)
    and out_dir/table.md; prints the table."""
    out = Path(cfg.out_dir)
    results = {"date": datetime.date.today().isoformat(), "machine": machine(),
               "commit": git_commit(), "wall_s": round(time.perf_counter() - started, 1),
               "config": {k: v for k, v in vars(cfg).items() if k != "given_keys"},
               **results}
    atomic_write(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write(out / "table.md", table + "\n")
    print(table)
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {cfg.figure} "
          f"({format_duration(results['wall_s'])} wall)")
    return results


def figure_title(cfg, text):
    seeds = f"mean over {cfg.seeds} seed{'s' if cfg.seeds > 1 else ''}"
    return f"{text}\n{seeds}; bands: ± 1 std over seeds (gains: of the paired differences)" + (
        " [smoke test]" if cfg.smoke else "")
