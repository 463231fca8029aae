"""
Offline weight averaging over a saved trajectory: every method and every hyperparameter setting
served from ONE pass over the checkpoints, each evaluated next to the raw weights.

    python average.py --ckpt_dir=out/shakespeare_char/snapshots
    python average.py --ckpt_dir=out/run/snapshots --methods=bema \\
        --bema_ema_power=[0.2,0.5] --bema_bias_power=[-1,0.2,0.4]     # 6 BEMA settings, one pass
    python average.py --ckpt_dir=out/run/snapshots --save=bema          # + the best BEMA weights
    python average.py config/avg_compare_shakespeare.py                 # a config file, as train.py
    python average.py --help                                            # every key and its default

Any averager key of averaging.py may be given a list; each method runs the cartesian product of
its lists, every combination as its own averager, all fed the same snapshots. The snapshots are
read in step order, each exactly once, one at a time (memory: the model + the averagers' state).

Offline time: an averager acts at the snapshots it is given (averaging.py's allow_gaps mode), with
t = s − τ from the real step s. The burn-in keys (bema_update_after, swa_start, lawa_start, ...)
default to the first snapshot's step and the period keys (bema_update_freq, swa_freq,
lawa_interval, wa_interval, ...) to 1, i.e. every snapshot; LAWA then averages the k latest
snapshots. With a snapshot at every step this is exactly the online averager of train.py
(tests/test_average.py checks it).

Outputs in out_dir (never inside ckpt_dir; every file written atomically): results.csv and
results.json (one row per step x setting: val loss; plus what was skipped and why), plot.png
(val loss vs step, raw and the best setting of each method), and with --save the averaged
weights as a snapshot that train.py --init_from, evaluation and sampling accept.
"""

import csv
import dataclasses
import io
import itertools
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import checkpoint
from averaging import AVERAGERS, build_averager, parse_method_list
from checkpoint import CheckpointError
from configurator import ConfigError, main
from dataloader import EvalBatches, evaluate_loss, open_dataset
from embedding_metrics import count_tokens, embedding_metrics
from flat_params import FlatParameters
from model import GPT, GPTConfig
from online_averaging import averager_fields
from report import markdown_table, plot_curves, progress
from runtime import check_dtype, init_runtime, teardown


def _sweepable(cls, key, default):
    """Every averager key takes a value or a list; burn-in/period keys default to None = "the
    first snapshot" / "every snapshot"."""
    if key in (cls.start_key, cls.freq_key):
        return int | list[int] | None, None
    if key in cls.optional_keys:   # T | None: a value, None, or a list of values
        kind = cls.optional_keys[key]
        return kind | list[kind] | None, default
    return type(default) | list[type(default)], default


SweepConfig = dataclasses.make_dataclass("SweepConfig", averager_fields(_sweepable))


@dataclass
class AverageConfig(SweepConfig):
    # input and output
    ckpt_dir: str = ""             # the trajectory: a run's snapshots/ (or any dir of checkpoints)
    out_dir: str = "out/average"   # results.csv/json, plot.png, saved/ (must not be in ckpt_dir)
    methods: str = "all"           # 'all' or a comma-separated subset of the methods
    # evaluation
    # The same val batches for the raw weights and every average: paired differences.
    dataset: str = "shakespeare_char"  # a prepared folder under data/ ...
    data_dir: str | None = None    # ... or an explicit path
    eval_iters: int = 50           # val batches per evaluation
    batch_size: int = 12
    block_size: int | None = None  # None: the model's context length
    seed: int = 1337               # picks the val batches
    eval_every: int = 0            # 0: evaluate at every snapshot; N: at steps divisible by N
                                   # (and the last)
    device: str = "auto"           # 'auto' (cuda if available) | 'cpu' | 'cuda' | 'cuda:1' ...
    dtype: str = "auto"            # 'auto' (bfloat16 autocast on CUDA, float32 on CPU) | ...
    embeddings: bool = False       # also the embedding metrics (embedding_metrics.py: isotropy,
                                   # norms, ...) of the raw and every averaged model, per eval
    skip_bad: bool = False         # warn and skip unreadable/mismatched files instead of stopping
    save: str | None = None        # 'best' | a method | a setting label: save those weights ...
    save_step: int | None = None   # ... at this step (None: the last)
    plot: bool = True              # write plot.png
    plot_x: str = "step"           # the plot's x axis: 'step' or 'tokens' (tokens seen)

    def __post_init__(self):
        if not self.ckpt_dir:
            raise ValueError("ckpt_dir is not set: --ckpt_dir=out/<run>/snapshots (or any "
                             "directory of checkpoints)")
        for key in ("eval_iters", "batch_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0")
        if self.eval_every < 0:
            raise ValueError(f"eval_every={self.eval_every} must be >= 0")
        check_dtype(self.dtype)
        if self.plot_x not in ("step", "tokens"):
            raise ValueError(f"plot_x={self.plot_x!r}: use 'step' or 'tokens'")
        ckpt, out = Path(self.ckpt_dir).resolve(), Path(self.out_dir).resolve()
        if out == ckpt or ckpt in out.parents:
            raise ValueError(f"out_dir={self.out_dir} is inside ckpt_dir={self.ckpt_dir}; the "
                             f"input directory is never written to: choose another out_dir")
        expand_settings(self, first_step=0)   # raises on a bad method name or hyperparameter


# ---------------------------------------------------------------------------------------------
# the settings of a sweep

@dataclass
class Setting:
    label: str      # 'bema' or 'bema[bema_ema_power=0.2,bema_bias_power=-1]'
    method: str
    hparams: dict   # the averager's complete hyperparameters
    swept: dict     # the keys given as lists, with this setting's values


def parse_methods(spec):
    return parse_method_list(spec, key="methods", allow_empty=False)


def expand_settings(cfg, first_step):
    """One Setting per combination of each method's list-valued keys (validated)."""
    settings = []
    for method in parse_methods(cfg.methods):
        cls = AVERAGERS[method]
        grid = {}
        for key in cls.defaults:
            value = getattr(cfg, key)
            if value is None and key in (cls.start_key, cls.freq_key):
                # burn-in / period not given: from the trajectory
                value = first_step if key == cls.start_key else 1
            grid[key] = value if isinstance(value, list) else [value]
            if not grid[key]:
                raise ConfigError(f"{key}=[]: give at least one value")
        swept_keys = [k for k, v in grid.items() if len(v) > 1]
        labels = set()
        for combo in itertools.product(*grid.values()):
            hparams = dict(zip(grid, combo))
            swept = {k: hparams[k] for k in swept_keys}
            label = method + ("[" + ",".join(f"{k}={_short(v)}" for k, v in swept.items())
                              + "]" if swept else "")
            if label in labels:
                raise ConfigError(f"the sweep lists the setting {label} twice")
            labels.add(label)
            try:
                build_averager(method, allow_gaps=True, **hparams)   # raises naming a bad key
            except ValueError as e:
                raise ConfigError(str(e)) from None
            settings.append(Setting(label, method, hparams, swept))
    return settings


def _short(value):
    """-1.0 -> '-1', 0.2 -> '0.2' (exactly representable in the label, else repr)."""
    if isinstance(value, float) and float(f"{value:g}") == value:
        return f"{value:g}"
    return repr(value)


# ---------------------------------------------------------------------------------------------
# the pass

class Trajectory:
    """Reads each file once, in step order, and loads it into one model (of the files' model
    args) whose weights are a flat buffer; a file that does not fit is an error (or skipped)."""

    def __init__(self, cfg, files, skipped, device):
        self.cfg, self.files, self.skipped, self.device = cfg, files, skipped, device
        self.model_args = {**files[0].model_args, "dropout": 0.0}
        self.model = GPT(GPTConfig(**self.model_args)).to(device)
        self.model.eval()
        self.flat = FlatParameters(self.model)

    def __iter__(self):
        for entry in progress(self.files, desc="snapshots"):
            try:
                weights = checkpoint.read_checkpoint(entry.path)
                self._load(weights, entry.path)
            except CheckpointError as e:
                if not self.cfg.skip_bad:
                    raise
                warnings.warn(f"skipped {entry.path.name}: {e}")
                self.skipped.append({"file": entry.path.name, "step": entry.step,
                                     "reason": str(e)})
                continue
            yield entry, weights

    def _load(self, weights, path):
        if {**weights.model_args, "dropout": 0.0} != self.model_args:
            raise CheckpointError(f"{path} is a checkpoint of another model: model_args "
                                  f"{weights.model_args} differ from the trajectory's "
                                  f"{self.model_args}")
        with torch.no_grad():
            checkpoint.load_model_state(self.model, weights.weights, path)


def average(cfg):
    """Run the pass; write results.csv/json and plot.png; return the summary (rows, best
    settings, skipped files, and the final averagers)."""
    files, ignored, bad = checkpoint.discover(cfg.ckpt_dir)
    skipped = []

    def skip(path, step, reason):
        if not cfg.skip_bad:
            raise CheckpointError(reason)
        warnings.warn(f"skipped {path.name}: {reason}")
        skipped.append({"file": path.name, "step": step, "reason": reason})

    for path, reason in bad:
        skip(path, None, reason)
    duplicates = checkpoint.duplicate_steps(files)
    if duplicates and not cfg.skip_bad:
        step, group = next(iter(duplicates.items()))
        skip(group[0].path, step, _duplicate_reason(cfg, step, group))
    files = _files_of_one_model(cfg, files, skip)
    for step, group in checkpoint.duplicate_steps(files).items():
        for f in group:   # which one belongs to the trajectory cannot be told: none is used
            skip(f.path, step, _duplicate_reason(cfg, step, group))
        files = [f for f in files if f not in group]
    if not files:
        raise CheckpointError(f"{cfg.ckpt_dir}: no readable checkpoint")
    steps = [f.step for f in files]
    _check_burn_in_steps(cfg, steps)
    eval_steps = {s for s in steps if cfg.eval_every == 0 or s % cfg.eval_every == 0}
    eval_steps.add(steps[-1])
    save_step = steps[-1] if cfg.save_step is None else cfg.save_step
    if cfg.save and save_step not in steps:
        raise ConfigError(f"save_step={cfg.save_step} is not a step of the trajectory "
                          f"({steps[0]}..{steps[-1]}, {len(steps)} files)")
    eval_steps.add(save_step)

    runtime = init_runtime(cfg.device, cfg.dtype)
    try:
        check_memory(files[0].model_args, expand_settings(cfg, first_step=steps[0]), runtime)
        data = open_dataset(cfg.dataset, cfg.data_dir)
        summary = _one_pass(cfg, runtime, data, files, steps, eval_steps, save_step, skipped)
    finally:
        teardown(runtime)
    summary["ignored"] = [p.name for p in ignored]
    _write_outputs(cfg, summary)
    print(format_table(summary["best"]))
    if skipped:
        print(f"skipped {len(skipped)} file(s): " +
              "; ".join(f"{s['file']} ({s['reason'][:80]})" for s in skipped))
    if summary["saved"]:
        saved = summary["saved"]
        print(f"saved {saved['label']} at step {saved['step']} to {saved['path']}")
    return summary


def _duplicate_reason(cfg, step, group):
    names = " and ".join(f.path.name for f in group)
    return (f"{names} are {'both' if len(group) == 2 else 'all'} step {step}; move all but one "
            f"out of {cfg.ckpt_dir}")


def _model_key(model_args):
    return json.dumps({k: v for k, v in model_args.items() if k != "dropout"}, sort_keys=True)


def _files_of_one_model(cfg, files, skip):
    """The files of the model most files hold: a stray file of another model (first or not)
    cannot decide what the trajectory is. A tie is an error."""
    groups = {}
    for f in files:
        groups.setdefault(_model_key(f.model_args), []).append(f)
    if len(groups) <= 1:
        return files
    ranked = sorted(groups.values(), key=len, reverse=True)
    if len(ranked[0]) == len(ranked[1]):
        raise CheckpointError(
            f"{cfg.ckpt_dir} holds {len(ranked[0])} checkpoints each of two models "
            f"({ranked[0][0].path.name}: {ranked[0][0].model_args}; {ranked[1][0].path.name}: "
            f"{ranked[1][0].model_args}); keep one model's files in the directory")
    chosen = ranked[0]
    for group in ranked[1:]:
        for f in group:
            skip(f.path, f.step, f"{f.path} is a checkpoint of another model: model_args "
                                 f"{f.model_args} differ from those of the trajectory's "
                                 f"{len(chosen)} of {len(files)} files {chosen[0].model_args}")
    return chosen


def check_memory(model_args, settings, runtime):
    """Print what the pass will hold (the model, the swap buffer, one temporary average and
    every setting's state, float32) and stop if the device cannot hold it."""
    with torch.device("meta"):
        numel = sum(p.numel() for p in GPT(GPTConfig(**{**model_args, "dropout": 0.0}))
                    .parameters())
    copies = {s.label: build_averager(s.method, allow_gaps=True, **s.hparams).state_copies()
              for s in settings}
    need = 4 * numel * (3 + sum(copies.values()))
    free = available_memory(runtime.device)
    print(f"memory: {need / 2**30:.2f} GiB for {numel:,} parameters x "
          f"({sum(copies.values())} state copies of {len(settings)} settings + 3)"
          + (f", {free / 2**30:.1f} GiB available on {runtime.device}" if free else ""))
    if free is not None and need > free:
        biggest = max(copies, key=copies.get)
        raise ConfigError(f"the sweep needs {need / 2**30:.1f} GiB but {runtime.device} has "
                          f"{free / 2**30:.1f} GiB available: sweep fewer settings per pass "
                          f"(split --methods or shorten the lists; the largest state is "
                          f"{biggest}, {copies[biggest]} copies of the weights)")


def available_memory(device):
    """Free bytes on a CUDA device, or the CPU's MemAvailable; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _one_pass(cfg, runtime, data, files, steps, eval_steps, save_step, skipped):
    token_counts = count_tokens(data.splits["train"], data.vocab_size) if cfg.embeddings else None
    traj = Trajectory(cfg, files, skipped, runtime.device)
    settings, averagers, rows, saved, batches = None, None, [], None, None
    for entry, weights in traj:
        if settings is None:   # the first readable snapshot fixes the model and the burn-ins
            settings = expand_settings(cfg, first_step=entry.step)
            _check_save_choice(cfg, settings)
            averagers = {s.label: build_averager(s.method, allow_gaps=True, **s.hparams)
                         for s in settings}
            block = cfg.block_size or traj.model_args["block_size"]
            data.check_fits(block, traj.model_args["vocab_size"])
            batches = EvalBatches(cfg.eval_iters, cfg.batch_size, block, cfg.seed)
            print(f"{len(files)} checkpoints, steps {steps[0]}..{steps[-1]}; "
                  f"{len(settings)} settings of {len(parse_methods(cfg.methods))} methods; "
                  f"evaluating at {len(eval_steps)} steps on {cfg.eval_iters} val batches")
        for averager in averagers.values():
            averager.update(entry.step, traj.flat.buffer)
        if entry.step not in eval_steps:
            continue

        def measure(step, method, label, hparams):
            loss = evaluate_loss(traj.model, data, batches, runtime, splits=("val",))["val"]
            row = _row(step, weights.tokens_seen, method, label, hparams, loss)
            if cfg.embeddings:
                metrics = embedding_metrics(traj.model.transformer.wte.weight, token_counts,
                                            vocab_size=data.vocab_size)
                row.update({k: metrics.get(k) for k in EMBEDDING_COLUMNS})
            return row

        step_rows = [measure(entry.step, "raw", "raw", {})]
        for s in settings:
            averager = averagers[s.label]
            if averager.average() is None:
                continue
            with averager.swapped_in(traj.flat):
                step_rows.append(measure(entry.step, s.method, s.label, s.hparams))
        rows += step_rows
        if cfg.save and entry.step == save_step:
            saved = _save(cfg, traj, settings, averagers, step_rows, entry, weights)
    if settings is None:
        raise CheckpointError(f"{cfg.ckpt_dir}: every checkpoint was skipped")
    return {"rows": rows, "best": best_settings(rows), "skipped": skipped, "saved": saved,
            "averagers": averagers,
            "files": [{"file": f.path.name, "step": f.step} for f in files]}


def _check_burn_in_steps(cfg, steps):
    """An explicit burn-in must be a step the trajectory has: averaging starts from θ_τ."""
    available = set(steps)
    for method in parse_methods(cfg.methods):
        key = AVERAGERS[method].start_key
        values = getattr(cfg, key)
        for tau in values if isinstance(values, list) else [values]:
            if tau is not None and tau not in available:
                later = [s for s in steps if s >= tau]
                hint = f"the next snapshot is step {later[0]}" if later else \
                    f"the last is step {steps[-1]}"
                raise ConfigError(f"{key}={tau}: there is no checkpoint of step {tau} in "
                                  f"{cfg.ckpt_dir} to start from ({hint})")


def _check_save_choice(cfg, settings):
    if not cfg.save:
        return
    choices = {"best"} | {s.method for s in settings} | {s.label for s in settings}
    if cfg.save not in choices:
        raise ConfigError(f"save={cfg.save!r}: use 'best', a method of this run "
                          f"({', '.join(sorted({s.method for s in settings}))}) or a setting "
                          f"label from results.csv")


EMBEDDING_COLUMNS = ("isotropy", "mean_norm", "norm_ratio", "singular_value_ratio",
                     "norm_logfreq_pearson")


def _row(step, tokens, method, label, hparams, loss):
    return {"step": step, "tokens": tokens, "method": method, "setting": label,
            "hparams": json.dumps(hparams, sort_keys=True), "val_loss": loss}


def _save(cfg, traj, settings, averagers, step_rows, entry, weights):
    """The lowest-loss setting among those `cfg.save` names, at this step, as a snapshot."""
    losses = {r["setting"]: r["val_loss"] for r in step_rows}
    candidates = [s for s in settings if s.label in losses and
                  cfg.save in ("best", s.method, s.label)]
    if not candidates:
        raise ConfigError(f"save={cfg.save!r}: no average of it exists at step {entry.step} "
                          f"(its burn-in is later)")
    choice = min(candidates, key=lambda s: losses[s.label])
    directory = Path(cfg.out_dir) / "saved" / re.sub(r"[^\w.=,+-]+", "_", choice.label)
    with averagers[choice.label].swapped_in(traj.flat):
        path = checkpoint.save_snapshot(
            directory, traj.model, entry.step, weights.tokens_seen or 0, traj.model_args,
            extra={"averager": choice.method, "hparams": choice.hparams,
                   "source": str(cfg.ckpt_dir)})
    return {"label": choice.label, "step": entry.step, "path": str(path),
            "val_loss": losses[choice.label]}


# ---------------------------------------------------------------------------------------------
# results

def best_settings(rows):
    """Per method, the setting with the lowest val loss at the last evaluated step, its gain
    over the raw weights there, and the lowest loss it reaches at any step."""
    last = max(r["step"] for r in rows)
    raw = {r["step"]: r["val_loss"] for r in rows if r["method"] == "raw"}
    best = []
    for method in dict.fromkeys(r["method"] for r in rows):
        at_last = [r for r in rows if r["method"] == method and r["step"] == last]
        if not at_last:
            continue
        top = min(at_last, key=lambda r: r["val_loss"])
        curve = [r for r in rows if r["setting"] == top["setting"]]
        lowest = min(curve, key=lambda r: r["val_loss"])
        best.append({"method": method, "setting": top["setting"], "step": last,
                     "val_loss": top["val_loss"], "gain": raw[last] - top["val_loss"],
                     "lowest": lowest["val_loss"], "lowest_step": lowest["step"]})
    return best


def format_table(best):
    return markdown_table(best, [
        ("method", "method"), ("best setting", "setting"),
        ("val loss", lambda b: f"{b['val_loss']:.4f}"),
        ("gain over raw", lambda b: "" if b["method"] == "raw" else f"{b['gain']:+.4f}"),
        ("lowest (step)", lambda b: f"{b['lowest']:.4f} ({b['lowest_step']})")])


def _write_outputs(cfg, summary):
    out = Path(cfg.out_dir)
    buffer = io.StringIO()
    columns = ["step", "tokens", "method", "setting", "hparams", "val_loss"]
    writer = csv.DictWriter(buffer, columns + (list(EMBEDDING_COLUMNS) if cfg.embeddings else []))
    writer.writeheader()
    writer.writerows(summary["rows"])
    for s in summary["skipped"]:
        writer.writerow({"step": s["step"], "method": "skipped", "setting": s["file"],
                         "hparams": s["reason"], "val_loss": math.nan})
    checkpoint.atomic_write(out / "results.csv", buffer.getvalue())
    record = {k: v for k, v in summary.items() if k != "averagers"}
    record["config"] = dataclasses.asdict(cfg)
    checkpoint.atomic_write(out / "results.json", json.dumps(record, indent=1))
    if cfg.plot:
        plot(summary, out / "plot.png", cfg)


def plot(summary, path, cfg):
    """Val loss vs step (or tokens): the raw weights and the best setting of each method, with
    the gain of each over the raw weights below; the run and the data in the title."""
    x = "tokens" if cfg.plot_x == "tokens" else "step"
    curves = {b["setting"]: [(r[x], r["val_loss"]) for r in summary["rows"]
                             if r["setting"] == b["setting"] and r[x] is not None]
              for b in summary["best"]}
    steps = [f["step"] for f in summary["files"]]
    data = cfg.data_dir or f"data/{cfg.dataset}"
    title = (f"{cfg.ckpt_dir}: {len(steps)} checkpoints, steps {steps[0]}..{steps[-1]}; val loss "
             f"on {data} ({cfg.eval_iters} batches)\nraw weights vs the best setting of each "
             f"method at the last step")
    return plot_curves(curves, path, title, xlabel="tokens seen" if x == "tokens" else "step")


if __name__ == "__main__":
    main(AverageConfig, average, __doc__)
