"""
Offline averaging over a saved trajectory, the library behind average.py: every method and every
hyperparameter setting served from ONE pass over the checkpoints, each evaluated next to the raw
weights.

    settings = expand_settings(cfg, first_step, stored)   # the sweep: one Setting per combination
    plan = make_plan(cfg, settings, trajectory, ...)      # who runs what where, and the memory
    summary = one_pass(cfg, runtime, data, trajectory, plan, ...)   # rows of (step, setting)
    average(cfg)                                          # all of it, outputs written

The settings are computed once from the config and the trajectory's first readable checkpoint,
the plan once from the settings, then the pass reads each file once, in step order. Offline time
(an averager acts at the snapshots it is given, with t = s − τ from the real step, and by
default a snapshot stands for the training steps since the previous one), post-hoc EMA
from stored profiles (posthoc.Reconstruction), state in host memory (host_state.py) and the
split over torchrun ranks are described in average.py's docstring, which is its --help.
"""

import csv
import dataclasses
import io
import itertools
import json
import math
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from averaging import AVERAGERS, SIGMA_REL_MAX, build_averager, parse_method_list
from model import GPT, GPTConfig
from wagpt import checkpoint, integrity
from wagpt.atomic import atomic_write
from wagpt.configurator import parse_choices
from wagpt.dataloader import EvalBatches, evaluate_loss, open_checkpoint_data
from wagpt.embedding_metrics import count_tokens, embedding_metrics
from wagpt.errors import CheckpointError, ConfigError
from wagpt.flat_params import FlatParameters
from wagpt.host_state import HostStateAverager
from wagpt.online_averaging import averager_fields
from wagpt.posthoc import Reconstruction, coverage, find_stored_profiles
from wagpt.report import markdown_table, plot_curves, progress
from wagpt.run_dir import ResultsDir
from wagpt.runtime import SAME_FILES, agree, check_dtype, init_runtime


def _sweepable(cls, key, default):
    """Every averager key takes a value or a list; burn-in/period keys default to None = "the
    first snapshot" / "every snapshot" (BEMA's period: train.py's, see expand_settings)."""
    if key in (cls.start_key, cls.freq_key):
        return int | list[int] | None, None
    if key in cls.optional_keys:   # T | None: a value, None, or a list of values
        kind = cls.optional_keys[key]
        return kind | list[kind] | None, default
    return type(default) | list[type(default)], default


SweepConfig = dataclasses.make_dataclass("SweepConfig", averager_fields(_sweepable))

PHEMA_SOURCES = ("auto", "profiles", "snapshots")
STATE_DEVICES = ("auto", "device", "host")
OFFLINE_TIMES = ("steps", "snapshots")


@dataclass
class AverageConfig(SweepConfig):
    # input and output
    ckpt_dir: str = ""             # the trajectory: a run's snapshots/ (or any dir of checkpoints)
    out_dir: str = "out/average"   # results.csv/json, plot.png, saved/ (must not be in ckpt_dir)
    overwrite: bool = False        # replace the results of an earlier analysis in out_dir (as
                                   # one set); without it such an out_dir is refused
    methods: str = "all"           # 'all' or a comma-separated subset of the methods
    mix_runs: bool = False         # average files of several runs anyway (by default only one
                                   # run's, or a run joined with its branches where they branched)
    offline_time: str = "steps"    # 'steps': a snapshot stands for the training steps since the
                                   # previous one, so a setting means what it does in train.py
                                   # (an EMA's decay d per step: d^k over a k-step gap) |
                                   # 'snapshots': one update per snapshot (docs/averaging.md)
    # post-hoc EMA
    # phema's widths (phema_sigma_rel or phema_gamma, lists sweep) reconstructed at every
    # evaluated step from the power-function EMA profiles train.py stored with the snapshots
    # (EDM2's least squares, docs/averaging.md), or replayed over the raw snapshots.
    phema_source: str = "auto"     # 'auto' (the stored profiles when the run has them, else the
                                   # snapshots) | 'profiles' | 'snapshots' | 'profiles,snapshots'
    posthoc_dir: str | None = None  # the stored profiles; None: posthoc/ beside ckpt_dir (a
                                   # run's snapshots/) or inside it
    posthoc_profiles: list[float] | None = None  # σ_rel of the stored profiles to reconstruct
                                   # from (None: all of them)
    # evaluation
    # The same val batches for the raw weights and every average: paired differences.
    dataset: str | None = None     # a prepared folder under data/ (None: the checkpoints') ...
    data_dir: str | None = None    # ... or an explicit path
    eval_iters: int = 50           # val batches per evaluation
    batch_size: int = 12
    block_size: int | None = None  # None: the model's context length
    seed: int = 1337               # picks the val batches
    select_iters: int | None = None  # held-out val batches (drawn with seed + 1, not the
                                   # reported ones) that choose each method's best setting and
                                   # --save=best's, evaluated at the last step and save_step;
                                   # None: eval_iters | 0: choose on the reported batches
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
    # memory and processes
    # Under torchrun (torchrun --nproc_per_node=N average.py ...) the settings are split over the
    # N processes and rank 0 writes the results: the same numbers as one process.
    state_device: str = "auto"     # where the averagers' state lives: 'device' | 'host' (pinned
                                   # CPU memory, updated chunk by chunk through the device) |
                                   # 'auto' (host when the sweep does not fit on the device)
    state_chunk: int = 2**24       # host state: parameters per chunk on the device (64 MiB)

    def __post_init__(self):
        if not self.ckpt_dir:
            raise ValueError("ckpt_dir is not set: --ckpt_dir=out/<run>/snapshots (or any "
                             "directory of checkpoints)")
        for key in ("eval_iters", "batch_size", "state_chunk"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0")
        if self.select_iters is not None and self.select_iters < 0:
            raise ValueError(f"select_iters={self.select_iters} must be >= 0 (0: choose on the "
                             f"reported batches)")
        if self.eval_every < 0:
            raise ValueError(f"eval_every={self.eval_every} must be >= 0")
        check_dtype(self.dtype)
        if self.plot_x not in ("step", "tokens"):
            raise ValueError(f"plot_x={self.plot_x!r}: use 'step' or 'tokens'")
        if self.offline_time not in OFFLINE_TIMES:
            raise ValueError(f"offline_time={self.offline_time!r}: use 'steps' (a snapshot "
                             f"counts the training steps since the previous one) or "
                             f"'snapshots' (one update per snapshot)")
        if self.state_device not in STATE_DEVICES:
            raise ValueError(f"state_device={self.state_device!r}: use 'auto', 'device' or "
                             f"'host'")
        phema_sources(self, stored=None)   # raises on a bad phema_source
        if self.posthoc_profiles is not None and not self.posthoc_profiles:
            raise ValueError("posthoc_profiles=[] selects no stored profile: give their widths "
                             "(σ_rel), e.g. [0.05,0.1], or None for all of them")
        for width in self.posthoc_profiles or []:
            if not 0 < width <= SIGMA_REL_MAX:
                raise ValueError(f"posthoc_profiles={self.posthoc_profiles}: {width} is not a "
                                 f"stored width (σ_rel in (0, {SIGMA_REL_MAX:.6f}])")
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
    source: str = "snapshots"   # what it averages: the raw 'snapshots', or the stored
                                # post-hoc 'profiles' (phema only)
    copies: int = 0             # float32 copies of the weights its state holds (for the plan)
    gamma: float | None = None  # phema: the power-function exponent γ of its width
    fill_gaps: bool = True      # offline_time 'steps': a gap counts the acting steps it spans

    def build(self):
        """A fresh averager of this setting (offline: acting steps may have gaps)."""
        return build_averager(self.method, allow_gaps=True, fill_gaps=self.fill_gaps,
                              **self.hparams)


def parse_methods(spec):
    return parse_method_list(spec, key="methods", allow_empty=False)


def phema_sources(cfg, stored):
    """What phema settings are computed from: ['snapshots'], ['profiles'] or both. 'auto' is
    the stored profiles when `stored` (StoredProfiles, None while they have not been looked for)
    has any, else the snapshots."""
    choices = parse_choices("phema_source", cfg.phema_source, PHEMA_SOURCES)
    if "auto" in choices:
        if len(choices) > 1:
            raise ConfigError(f"phema_source={cfg.phema_source!r}: 'auto' stands alone; give "
                              f"'profiles', 'snapshots' or 'profiles,snapshots'")
        return ["profiles"] if stored is not None and stored.files else ["snapshots"]
    if "profiles" in choices and stored is not None and not stored.files:
        looked = " or ".join(str(d) for d in stored.looked_in) or "(nowhere: ckpt_dir is not a " \
                                                                   "run's snapshots/)"
        raise ConfigError(
            f"phema_source={cfg.phema_source!r}, but there are no stored post-hoc profiles in "
            f"{looked}: train with snapshots (--snapshot_interval=N) and the profiles on "
            f"(--posthoc_sigma_rel=[0.05,0.1], the default), or point --posthoc_dir at them; "
            f"--phema_source=snapshots replays a phema over the raw snapshots instead")
    return choices


def expand_settings(cfg, first_step, stored=None):
    """One Setting per combination of each method's list-valued keys, each validated by
    building its averager once; phema once per source (phema_sources). A phema from the stored
    profiles takes their burn-in and period (`stored`, StoredProfiles; placeholders while it is
    None)."""
    settings = []
    for method in parse_methods(cfg.methods):
        cls = AVERAGERS[method]
        for source in phema_sources(cfg, stored) if method == "phema" else ["snapshots"]:
            grid = {}
            for key in cls.defaults:
                value = getattr(cfg, key)
                if source == "profiles" and key in (cls.start_key, cls.freq_key):
                    value = _stored_value(key, value, stored)
                elif value is None and key == cls.start_key:   # not given: the first snapshot
                    value = first_step
                elif value is None and key == cls.freq_key:
                    # not given: every snapshot, or train.py's period where it is part of the
                    # estimate and time counts in steps (BEMA's φ)
                    value = (cls.defaults[key] if cls.period_is_part_of_estimate
                             and cfg.offline_time == "steps" else 1)
                grid[key] = value if isinstance(value, list) else [value]
                if not grid[key]:
                    raise ConfigError(f"{key}=[]: give at least one value")
            swept_keys = [k for k, v in grid.items() if len(v) > 1]
            shown = {"phema_source": source} if method == "phema" else {}
            labels = {s.label for s in settings}
            for combo in itertools.product(*grid.values()):
                hparams = dict(zip(grid, combo))
                swept = {k: hparams[k] for k in swept_keys}
                named = {**shown, **swept}
                label = method + ("[" + ",".join(f"{k}={_short(v)}" for k, v in named.items())
                                  + "]" if named else "")
                if label in labels:
                    raise ConfigError(f"the sweep lists the setting {label} twice")
                labels.add(label)
                try:
                    averager = build_averager(method, allow_gaps=True, **hparams)
                except ValueError as e:   # names the key
                    raise ConfigError(str(e)) from None
                copies = 2 if source == "profiles" else averager.state_copies()
                settings.append(Setting(label, method, hparams, swept, source, copies,
                                        getattr(averager, "gamma", None),
                                        fill_gaps=cfg.offline_time == "steps"))
    return settings


def _stored_value(key, given, stored):
    """The stored profiles' burn-in or period for phema's `key`; a value the user gave must be
    theirs (a reconstruction cannot change when the stored averages started or how often they
    were updated)."""
    is_start = key == AVERAGERS["phema"].start_key
    if stored is None:   # not looked for yet (config validation): any given value passes here
        return given if given is not None else (0 if is_start else 1)
    value = stored.tau if is_start else stored.phi
    for v in given if isinstance(given, list) else [given]:
        if v is not None and v != value:
            raise ConfigError(
                f"{key}={given}, but the stored post-hoc profiles in {stored.directory} have "
                f"{'burn-in' if is_start else 'period'} {value}: a reconstruction keeps it; "
                f"drop --{key}, or replay a phema over the raw snapshots with "
                f"--phema_source=snapshots")
    return value


def _short(value):
    """-1.0 -> '-1', 0.2 -> '0.2' (exactly representable in the label, else repr); strings
    as they are."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and float(f"{value:g}") == value:
        return f"{value:g}"
    return repr(value)


def check_burn_in_steps(cfg, steps):
    """An explicit burn-in must be a step the trajectory has: averaging starts from θ_τ (a
    phema reconstructed from stored profiles takes theirs and is checked against them)."""
    available = set(steps)
    for method in parse_methods(cfg.methods):
        key = AVERAGERS[method].start_key
        values = getattr(cfg, key)
        if method == "phema" and "snapshots" not in cfg.phema_source and \
                cfg.phema_source != "auto":
            continue
        for tau in values if isinstance(values, list) else [values]:
            if tau is not None and tau not in available:
                later = [s for s in steps if s >= tau]
                hint = f"the next snapshot is step {later[0]}" if later else \
                    f"the last is step {steps[-1]}"
                raise ConfigError(f"{key}={tau}: there is no checkpoint of step {tau} in "
                                  f"{cfg.ckpt_dir} to start from ({hint})")


def check_save_choice(cfg, settings):
    if not cfg.save:
        return
    choices = {"best"} | {s.method for s in settings} | {s.label for s in settings}
    if cfg.save not in choices:
        raise ConfigError(f"save={cfg.save!r}: use 'best', a method of this run "
                          f"({', '.join(sorted({s.method for s in settings}))}) or a setting "
                          f"label from results.csv")


# ---------------------------------------------------------------------------------------------
# the trajectory

class Trajectory:
    """The checkpoint files of one model in a directory, in step order, each read once: bad
    files are named (or, with skip_bad, skipped and listed in `skipped`). `first()` reads files
    until one loads and keeps it for the pass, so the first step (the default burn-in of every
    setting) is that of a checkpoint that really loads."""

    def __init__(self, cfg):
        self.cfg, self.skipped = cfg, []
        files, self.ignored, bad = checkpoint.discover(cfg.ckpt_dir)
        for path, reason in bad:
            self.skip(path, None, reason)
        duplicates = checkpoint.duplicate_steps(files)
        if duplicates and not cfg.skip_bad:
            step, group = next(iter(duplicates.items()))
            self.skip(group[0].path, step, self._duplicate_reason(step, group))
        files = self._files_of_one_model(files)
        files = self._files_of_one_run(files)
        for step, group in checkpoint.duplicate_steps(files).items():
            for f in group:   # which one belongs to the trajectory cannot be told: none is used
                self.skip(f.path, step, self._duplicate_reason(step, group))
            files = [f for f in files if f not in group]
        if not files:
            raise CheckpointError(f"{cfg.ckpt_dir}: no readable checkpoint")
        self.files = files
        self.model_args = {**files[0].model_args, "dropout": 0.0}
        self._first = None   # (file, record) read by first()

    @property
    def steps(self):
        return [f.step for f in self.files]

    def skip(self, path, step, reason):
        if not self.cfg.skip_bad:
            raise CheckpointError(reason)
        warnings.warn(f"skipped {path.name}: {reason}")
        self.skipped.append({"file": path.name, "step": step, "reason": reason})

    def first(self):
        """(file, record) of the first checkpoint whose tensors load; the unreadable ones
        before it are skipped (or raise), and dropped from `files`."""
        while self._first is None:
            if not self.files:
                raise CheckpointError(f"{self.cfg.ckpt_dir}: every checkpoint was skipped")
            entry = self.files[0]
            try:
                self._first = (entry, self._read(entry))
            except CheckpointError as e:
                self.skip(entry.path, entry.step, str(e))
                self.files = self.files[1:]
        return self._first

    def read_all(self, model, times, show_progress):
        """(file, record) of each file in step order, its weights loaded into `model` (of the
        trajectory's model args), each file read once; unreadable files skipped or raised."""
        first = self.first()
        files = progress(self.files, desc="snapshots") if show_progress else self.files
        for entry in files:
            try:
                with times("read"):
                    record = first[1] if entry is first[0] else self._read(entry)
                    with torch.no_grad():
                        checkpoint.load_model_state(model, record.weights, entry.path)
            except CheckpointError as e:
                self.skip(entry.path, entry.step, str(e))
                continue
            yield entry, record

    def _read(self, entry):
        record = checkpoint.read_checkpoint(entry.path)
        if {**record.model_args, "dropout": 0.0} != self.model_args:
            raise CheckpointError(f"{entry.path} is a checkpoint of another model: model_args "
                                  f"{record.model_args} differ from the trajectory's "
                                  f"{self.model_args}")
        return record

    def _duplicate_reason(self, step, group):
        names = " and ".join(f.path.name for f in group)
        return (f"{names} are {'both' if len(group) == 2 else 'all'} step {step}; move all but "
                f"one out of {self.cfg.ckpt_dir}")

    def _files_of_one_run(self, files):
        """The files of one run (or of a run and its branches, joined where they branched):
        files of another run are an error naming both (with skip_bad, the run most files hold
        is kept and the others' skipped); mix_runs=True takes every file."""
        pair = None if self.cfg.mix_runs else mixed_runs(files)
        if pair is None:
            return files
        if not self.cfg.skip_bad:
            raise CheckpointError(mixed_runs_message(self.cfg.ckpt_dir, *pair))
        groups = {}
        for f in files:
            groups.setdefault(f.run["id"] if f.run else None, []).append(f)
        ranked = sorted((g for key, g in groups.items() if key is not None), key=len, reverse=True)
        if len(ranked[0]) == len(ranked[1]):
            raise CheckpointError(mixed_runs_message(self.cfg.ckpt_dir, *pair))
        kept = ranked[0][0].run["id"]
        for group in ranked[1:]:
            for f in group:
                self.skip(f.path, f.step, f"{f.path} is a file of run {f.run['id']}, not of run "
                                          f"{kept} like {len(ranked[0])} of {len(files)} files")
        return [f for f in files if f.run is None or f.run["id"] == kept]

    def _files_of_one_model(self, files):
        """The files of the model most files hold: a stray file of another model (first or
        not) cannot decide what the trajectory is. A tie is an error."""
        groups = {}
        for f in files:
            key = json.dumps({k: v for k, v in f.model_args.items() if k != "dropout"},
                             sort_keys=True)
            groups.setdefault(key, []).append(f)
        if len(groups) <= 1:
            return files
        ranked = sorted(groups.values(), key=len, reverse=True)
        if len(ranked[0]) == len(ranked[1]):
            raise CheckpointError(
                f"{self.cfg.ckpt_dir} holds {len(ranked[0])} checkpoints each of two models "
                f"({ranked[0][0].path.name}: {ranked[0][0].model_args}; "
                f"{ranked[1][0].path.name}: {ranked[1][0].model_args}); keep one model's files "
                f"in the directory")
        chosen = ranked[0]
        for group in ranked[1:]:
            for f in group:
                self.skip(f.path, f.step, f"{f.path} is a checkpoint of another model: "
                                          f"model_args {f.model_args} differ from those of the "
                                          f"trajectory's {len(chosen)} of {len(files)} files "
                                          f"{chosen[0].model_args}")
        return chosen


def mixed_runs(files):
    """None when `files` (with .path, .step and .run, checkpoint.TrajectoryFile) are one run's,
    or a run joined with branches of it where they branched (the parent's files up to the step
    the branch started from, the branch's after it: a cooldown branched off a long run); else
    (a file of one run, a file of another) that do not belong together. Files that record no
    run (written before runs had ids, or by nanoGPT) go with any."""
    runs = {}
    for f in files:
        if f.run is not None:
            runs.setdefault(f.run["id"], []).append(f)
    order = sorted(runs.values(), key=lambda group: min(f.step for f in group))
    for earlier, later in zip(order, order[1:]):
        parent = later[0].run["parent"] or {}
        last = max(earlier, key=lambda f: f.step)
        first = min(later, key=lambda f: f.step)
        if not (parent.get("id") == last.run["id"] and
                last.step <= parent["step"] < first.step):
            return last, first
    return None


def mixed_runs_message(where, a, b):
    parent = b.run["parent"]
    origin = (f", a branch of run {parent['id']} at step {parent['step']}"
              if parent and parent["id"] else "")
    return (f"{where} mixes the files of two runs: {a.path.name} (step {a.step}) is run "
            f"{a.run['id']}, {b.path.name} (step {b.step}) is run {b.run['id']}{origin}; "
            f"average one run's files, or join a branch to its parent where it branched (the "
            f"parent's files up to that step, the branch's after it: a branch's files record "
            f"its parent run and step), or pass --mix_runs=True to average them anyway")


def check_profiles_run(cfg, trajectory, stored):
    """The stored post-hoc profiles must be those of the trajectory's run (or of its lineage,
    as mixed_runs says): a ConfigError naming a profile file and a snapshot of different runs
    otherwise (mix_runs=True takes them anyway)."""
    if cfg.mix_runs or stored is None or not stored.files:
        return
    profiles = [checkpoint.TrajectoryFile(path, step, trajectory.model_args,
                                          stored.runs.get(path))
                for path, step, _ in stored.files]
    pair = mixed_runs(trajectory.files + profiles)
    if pair is not None:
        raise ConfigError(mixed_runs_message(f"{cfg.ckpt_dir} with the post-hoc profiles in "
                                             f"{stored.directory}", *pair))


def check_profile_coverage(cfg, settings, stored, eval_steps, runtime):
    """A phema from the stored profiles is only reconstructed at steps some stored profile
    reaches (posthoc.coverage): at the others (profiles switched off on resume, or files
    missing) it would be an average of older profiles. Those steps are a ConfigError naming the
    steps that can be reconstructed, or with skip_bad one warning and no rows there."""
    if stored is None or not any(s.source == "profiles" for s in settings):
        return
    covered, uncovered = coverage(stored.files, eval_steps, stored.tau, stored.phi)
    if not uncovered:
        return
    last = stored.files[-1][1] if stored.files else None
    what = (f"the stored post-hoc profiles in {stored.directory} (the last of step {last}) do "
            f"not reach steps {steps_text(uncovered)}, where a phema could only be built from "
            f"older profiles")
    if cfg.skip_bad:
        if runtime.master:
            warnings.warn(f"{what}: phema from the profiles is left out there", stacklevel=2)
        return
    raise ConfigError(f"{what}; the steps that can be reconstructed are "
                      f"{steps_text(covered) if covered else 'none'}. Replay a phema over the "
                      f"raw snapshots with --phema_source=snapshots, or leave those steps out "
                      f"with --skip_bad=True")


def steps_text(steps):
    """'4, 8, 12' or '4, 8, 12, ..., 36, 40 (10 steps)'."""
    steps = list(steps)
    if len(steps) <= 8:
        return ", ".join(map(str, steps))
    return (", ".join(map(str, steps[:3])) + ", ..., " + ", ".join(map(str, steps[-2:])) +
            f" ({len(steps)} steps)")


def profile_directories(cfg):
    """Where a run's post-hoc profiles are: --posthoc_dir, else posthoc/ beside ckpt_dir when
    that is a run's snapshots/, or inside it (ckpt_dir = the run's out_dir)."""
    if cfg.posthoc_dir:
        if not Path(cfg.posthoc_dir).is_dir():
            raise CheckpointError(f"posthoc_dir={cfg.posthoc_dir} does not exist")
        return [Path(cfg.posthoc_dir)]
    ckpt = Path(cfg.ckpt_dir)
    return ([ckpt.parent / "posthoc"] if ckpt.name == "snapshots" else []) + [ckpt / "posthoc"]


def profile_reader(flat, names, device):
    """read(path) for posthoc.Reconstruction: {name: flat float32 weights on `device`} of the
    named profiles in a posthoc file."""
    def read(path):
        record = checkpoint.read_posthoc(path)
        return {name: flat.flat_from_state(record.weights[name], f"{path} ({name})",
                                           device=device)
                for name in names if name in record.weights}
    return read


# ---------------------------------------------------------------------------------------------
# the plan: which process runs which setting, where the state lives, how much memory

@dataclass
class Placement:
    state: str          # 'device' or 'host': where the averagers' state and the
                        # reconstruction's accumulators live
    window: int         # evaluation steps the reconstruction accumulates at once


@dataclass
class Plan:
    settings: list      # every Setting of the sweep
    owner: dict         # label (and 'raw') -> the rank that updates and evaluates it
    mine: list          # this process's settings
    placement: Placement
    eval_steps: list    # the steps evaluated, in order
    save_step: int | None   # the step --save writes (None: no --save)


def make_plan(cfg, settings, trajectory, stored, runtime):
    """The Plan of the pass: evaluation steps, the split over ranks, and the placement that the
    memory check chose (agreed by every rank)."""
    steps = trajectory.steps
    eval_steps = {s for s in steps if cfg.eval_every == 0 or s % cfg.eval_every == 0}
    eval_steps.add(steps[-1])
    save_step = None
    if cfg.save:
        save_step = steps[-1] if cfg.save_step is None else cfg.save_step
        if save_step not in steps:
            raise ConfigError(f"save_step={cfg.save_step} is not a step of the trajectory "
                              f"({steps[0]}..{steps[-1]}, {len(steps)} files)")
        eval_steps.add(save_step)
    owner = assign_ranks(settings, runtime.world_size)
    mine = [s for s in settings if owner[s.label] == runtime.rank]
    neighbours = host_neighbours(settings, owner, runtime)
    placement = agree(runtime, lambda: check_memory(trajectory.model_args, mine, runtime, cfg,
                                                    stored, len(eval_steps), neighbours))
    return Plan(settings, owner, mine, placement, sorted(eval_steps), save_step)


def host_neighbours(settings, owner, runtime):
    """The settings of each other process on this host (torchrun numbers the ranks of a host
    consecutively): they share its memory with this one."""
    first = runtime.rank - runtime.local_rank
    return [[s for s in settings if owner[s.label] == rank]
            for rank in range(first, first + runtime.local_world_size) if rank != runtime.rank]


def check_memory(model_args, settings, runtime, cfg=None, stored=None, eval_steps=1,
                 neighbours=()):
    """Print what this process's share of the pass holds (the model, the swap buffer, one
    temporary average, every setting's state, float32, and the reconstruction's float64
    accumulators) and where; return the Placement. Where that is host memory (the CPU as the
    device, or the state on the host), the shares of the other processes on this host
    (`neighbours`: their settings) count against it too. With state_device 'auto' the state
    goes to host memory when the device (a GPU) cannot hold it; with too little memory either
    way, stop, naming the fix."""
    with torch.device("meta"):
        numel = sum(p.numel() for p in GPT(GPTConfig(**{**model_args, "dropout": 0.0}))
                    .parameters())
    replays = [s for s in settings if s.source == "snapshots"]
    copies = {s.label: s.copies for s in replays}
    widths = sum(s.source == "profiles" for s in settings)
    per_file = len(stored.files[0][2]) if stored and stored.files else 0

    def reconstruction(window, widths=widths):
        # float32 copies: 2 per float64 accumulator, R outputs, a file
        return 0 if not widths else 2 * widths * window + widths + 2 * per_file

    gib = 4 * numel / 2**30
    state_of = lambda window: sum(copies.values()) + reconstruction(window)   # noqa: E731
    fixed = 3   # the model, the swap buffer, one temporary average
    device_free = available_memory(runtime.device)
    host_free = available_memory(torch.device("cpu"))
    mode = cfg.state_device if cfg is not None else "device"
    separate = runtime.device.type == "cuda"   # else the "device" is host memory already
    if mode == "auto":
        mode = "host" if separate and device_free is not None and \
            gib * (fixed + state_of(1)) * 2**30 > device_free else "device"
    pool = host_free if mode == "host" and separate else device_free
    on_pool = 0 if mode == "host" and separate else fixed
    shared = neighbours if mode == "host" or not separate else []   # this host's memory

    def in_pool(window):   # copies in the pool: this process's, and its neighbours' there
        return on_pool + state_of(window) + sum(
            on_pool + sum(s.copies for s in other if s.source == "snapshots") +
            reconstruction(window, sum(s.source == "profiles" for s in other))
            for other in shared)
    window = max(1, eval_steps)
    if widths and pool is not None:   # as many evaluation steps at once as fit
        while window > 1 and gib * in_pool(window) * 2**30 > pool:
            window -= 1
    need = gib * (fixed + state_of(window)) * 2**30
    text = (f"memory: {need / 2**30:.2f} GiB for {numel:,} parameters x "
            f"({sum(copies.values())} state copies of {len(replays)} settings + 3)")
    if widths:
        text += (f" + {reconstruction(window)} copies for the post-hoc reconstruction ({widths} "
                 f"widths in float64 at {window} of {eval_steps} evaluation steps at a time)")
    if mode == "host" and separate:
        text += (f"; the state in pinned host memory ({host_free / 2**30:.1f} GiB available), "
                 f"{state_chunk_gib(cfg, numel):.2f} GiB chunks through {runtime.device}")
    elif pool:
        text += f", {pool / 2**30:.1f} GiB available on {runtime.device}"
    if runtime.ddp:
        text += f" (rank {runtime.rank} of {runtime.world_size})"
    if shared:
        text += (f"; with the {len(shared)} other process(es) on this host, "
                 f"{gib * in_pool(window):.2f} GiB of its memory")
    if runtime.master:
        print(text)
    need_in_pool = gib * in_pool(window) * 2**30
    if pool is not None and need_in_pool > pool:
        where = ("host memory" if mode == "host" and separate else str(runtime.device)) + (
            f" (shared by this host's {len(shared) + 1} processes)" if shared else "")
        biggest = max(copies, key=copies.get) if copies else "the reconstruction"
        hint = ("; or keep the state in host memory with --state_device=host"
                if separate and mode == "device" else "")
        raise ConfigError(f"the sweep needs {need_in_pool / 2**30:.1f} GiB but {where} has "
                          f"{pool / 2**30:.1f} GiB available: sweep fewer settings per pass "
                          f"(split --methods or shorten the lists; the largest state is "
                          f"{biggest}, {copies.get(biggest, reconstruction(1))} copies of the "
                          f"weights), or run it under torchrun over more "
                          f"{'hosts' if shared else 'processes'}{hint}")
    return Placement(mode, window)


def state_chunk_gib(cfg, numel):
    return 4 * min(cfg.state_chunk if cfg else numel, numel) / 2**30


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


def assign_ranks(settings, world_size):
    """{label: rank} for every setting and 'raw': the rank that updates and evaluates it. Each
    item weighs one evaluation plus its state copies (the update's memory traffic), and goes to
    the least loaded rank, heaviest first (the same answer on every rank)."""
    if world_size == 1:
        return {"raw": 0, **{s.label: 0 for s in settings}}
    items = [("raw", 1)] + [(s.label, 1 + s.copies) for s in settings]
    load = [0] * world_size
    owner = {}
    for label, weight in sorted(items, key=lambda item: -item[1]):   # stable: ties in order
        rank = min(range(world_size), key=lambda r: load[r])
        owner[label] = rank
        load[rank] += weight
    return owner


# ---------------------------------------------------------------------------------------------
# the pass

class PhaseTimes:
    """Seconds spent per phase ('read', 'average', 'evaluate'), the device synchronised at each
    boundary so that GPU work is counted where it is queued."""

    def __init__(self, device):
        self.device = device
        self.seconds = {"read": 0.0, "average": 0.0, "evaluate": 0.0}

    @contextmanager
    def __call__(self, phase):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] += time.perf_counter() - start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


EMBEDDING_COLUMNS = ("isotropy", "mean_norm", "norm_ratio", "singular_value_ratio",
                     "norm_logfreq_pearson")


def one_pass(cfg, runtime, data, trajectory, plan, stored=None, staging=None):
    """Feed every checkpoint, once and in step order, to this process's averagers; at each
    evaluation step evaluate the raw weights and every setting this process owns on the same
    val batches. Returns this process's part of the summary (rank 0 gathers every rank's rows
    under torchrun). --save writes into `staging` (claimed_results), else into out_dir."""
    model = GPT(GPTConfig(**trajectory.model_args)).to(runtime.device)
    model.eval()
    flat = FlatParameters(model)
    numel = flat.buffer.numel()
    state_device = torch.device("cpu") if plan.placement.state == "host" else runtime.device
    averagers = {}
    for s in plan.mine:
        if s.source == "snapshots":
            averagers[s.label] = (HostStateAverager(s.build, numel, runtime.device,
                                                    cfg.state_chunk)
                                  if plan.placement.state == "host" else s.build())
    targets = {s.label: s.gamma for s in plan.mine if s.source == "profiles"}
    rebuild = None
    if targets:
        names = {name for _, _, profiles in stored.files for name, _, _ in profiles}
        rebuild = Reconstruction(stored.files, targets, plan.eval_steps, stored.tau, stored.phi,
                                 profile_reader(flat, names, state_device), device=state_device,
                                 window=plan.placement.window)
    block = cfg.block_size or trajectory.model_args["block_size"]
    data.check_fits(block, trajectory.model_args["vocab_size"])
    batches = EvalBatches(cfg.eval_iters, cfg.batch_size, block, cfg.seed)
    select = select_batches(cfg, block)
    select_steps = {plan.eval_steps[-1], plan.save_step} if select else set()
    token_counts = count_tokens(data.splits["train"], data.vocab_size) if cfg.embeddings else None
    local = dataclasses.replace(runtime, rank=0, world_size=1)   # evaluations are not split
    times = PhaseTimes(runtime.device)
    steps = trajectory.steps
    if runtime.master:
        print(f"{len(steps)} checkpoints, steps {steps[0]}..{steps[-1]}; "
              f"{len(plan.settings)} settings of {len(parse_methods(cfg.methods))} methods"
              f"{f' over {runtime.world_size} processes' if runtime.ddp else ''}; "
              f"evaluating at {len(plan.eval_steps)} steps on {cfg.eval_iters} val batches")
        if stored is not None and stored.files:
            print(f"post-hoc profiles: {len(stored.files)} files in {stored.directory}, "
                  f"σ_rel {', '.join(f'{w:g}' for w in stored.widths)} (from step "
                  f"{stored.tau}, every {stored.phi} steps)")

    def measure(entry, record, setting, error=None):
        loss = evaluate_loss(model, data, batches, local, splits=("val",))["val"]
        method, label = (setting.method, setting.label) if setting else ("raw", "raw")
        row = {"step": entry.step, "tokens": record.tokens_seen, "method": method,
               "setting": label, "source": setting.source if setting else "snapshots",
               "hparams": json.dumps(setting.hparams if setting else {}, sort_keys=True),
               "val_loss": loss, "reconstruction_error": error,
               "select_loss": evaluate_loss(model, data, select, local, splits=("val",))["val"]
               if entry.step in select_steps else None}
        if cfg.embeddings:
            metrics = embedding_metrics(model.transformer.wte.weight, token_counts,
                                        vocab_size=data.vocab_size)
            row.update({k: metrics.get(k) for k in EMBEDDING_COLUMNS})
        return row

    rows, saved, evaluated = [], None, set(plan.eval_steps)
    for entry, record in trajectory.read_all(model, times, show_progress=runtime.master):
        with times("average"):
            for averager in averagers.values():
                averager.update(entry.step, flat.buffer)
        if entry.step not in evaluated:
            continue
        with times("average"):   # reading the stored profiles and synthesising
            rebuilt = rebuild.at(entry.step) if rebuild is not None else {}

        def swapped(setting):
            if setting.source == "profiles":
                return flat.swapped(rebuilt[setting.label])
            return averagers[setting.label].swapped_in(flat)

        step_rows = []
        with times("evaluate"):
            if plan.owner["raw"] == runtime.rank:
                step_rows.append((0, measure(entry, record, None)))
            for position, s in enumerate(plan.settings, start=1):
                if plan.owner[s.label] != runtime.rank:
                    continue
                if s.source == "profiles":
                    if s.label not in rebuilt:
                        continue   # before the profiles' first update
                    error = rebuild.errors[entry.step][s.label]
                elif averagers[s.label].step is None:
                    continue       # before its burn-in
                else:
                    error = None
                with swapped(s):
                    step_rows.append((position, measure(entry, record, s, error)))
        rows += [(entry.step, position, row) for position, row in step_rows]
        if entry.step == plan.save_step:
            saved = save_average(cfg, runtime, model, trajectory.model_args, plan, swapped,
                                 [row for _, row in step_rows], entry, record, staging)
        rebuilt.clear()   # free the reconstructed weights before the next file is read
    return {"rows": rows, "saved": saved, "timing": dict(times.seconds), "averagers": averagers}


def save_average(cfg, runtime, model, model_args, plan, swapped, step_rows, entry, record,
                 staging=None):
    """The lowest-loss setting among those `cfg.save` names, at this step, as a snapshot
    (written by the rank that owns it, into `staging`, its place in out_dir once the results
    are committed; every rank takes part in choosing). Settings whose loss is not finite are
    never chosen, and weights that are not finite never written (the returned record then
    holds the error, raised once the ranks have met)."""
    rows = {r["setting"]: {k: r[k] for k in ("val_loss", "select_loss")} for r in step_rows}
    if runtime.ddp:
        every = [None] * runtime.world_size
        dist.all_gather_object(every, rows, group=runtime.control_group)
        rows = {k: v for part in every for k, v in part.items()}
    losses = {label: _choice_loss(row) for label, row in rows.items()}   # held-out if measured
    named = [s for s in plan.settings if s.label in losses and
             cfg.save in ("best", s.method, s.label)]
    if not named:
        raise ConfigError(f"save={cfg.save!r}: no average of it exists at step {entry.step} "
                          f"(its burn-in is later)")
    candidates = [s for s in named if math.isfinite(losses[s.label])]
    if not candidates:
        raise ConfigError(f"save={cfg.save!r}: the loss of {named[0].label} at step "
                          f"{entry.step} is {losses[named[0].label]}"
                          f"{' as are the others' if len(named) > 1 else ''}; nothing is saved")
    choice = min(candidates, key=lambda s: losses[s.label])
    if plan.owner[choice.label] != runtime.rank:
        return None
    relative = Path("saved") / re.sub(r"[^\w.=,+-]+", "_", choice.label)
    directory = Path(staging or cfg.out_dir) / relative
    with swapped(choice):
        if not integrity.all_finite(list(model.parameters())):
            return {"label": choice.label, "error": f"the {choice.label} average at step "
                                                    f"{entry.step} is not finite; nothing is "
                                                    f"saved"}
        path = checkpoint.save_snapshot(
            directory, model, entry.step, record.tokens_seen or 0, model_args,
            extra={"averager": choice.method, "hparams": choice.hparams,
                   "source": str(cfg.ckpt_dir) if choice.source == "snapshots" else
                   f"post-hoc profiles in {cfg.posthoc_dir or 'posthoc/'}",
                   **({"data": record.data} if record.data else {})}, run=record.run)
    return {"label": choice.label, "step": entry.step,
            "path": str(Path(cfg.out_dir) / relative / path.name),
            **rows[choice.label]}


@contextmanager
def claimed_results(cfg, runtime):
    """`with claimed_results(cfg, runtime) as results:` rank 0 holds out_dir for this analysis
    (run_dir.ResultsDir: the lock, the refusal of another analysis's results unless
    --overwrite, the writability, before any work); every rank gets `results.staging`, where
    the result set is written before rank 0 commits it as one."""
    results = ResultsDir(cfg.out_dir, cfg.overwrite)
    agree(runtime, lambda: results.claim() if runtime.master else None)
    staging = [results.staging]
    if runtime.ddp:   # the rank that owns --save's choice writes it there too
        dist.broadcast_object_list(staging, src=0, group=runtime.control_group)
    results.staging = Path(staging[0])
    try:
        yield results
    finally:
        if runtime.master:
            results.release()


def gather_rows(part, runtime):
    """Every rank's part on rank 0, rows in (step, setting) order; other ranks keep their own."""
    if runtime.ddp:
        parts = [None] * runtime.world_size if runtime.master else None
        dist.gather_object({k: v for k, v in part.items() if k != "averagers"}, parts, dst=0,
                           group=runtime.control_group)
        # no rank tears its process group down while rank 0 may still be receiving (gloo's
        # send can return before the transfer ends; exiting then aborts the process)
        dist.barrier(group=runtime.control_group)
    else:
        parts = [part]
    if not runtime.master:
        return [row for _, _, row in part["rows"]], part["saved"], [part["timing"]]
    rows = [row for _, _, row in sorted((r for p in parts for r in p["rows"]),
                                        key=lambda r: (r[0], r[1]))]
    saved = next((p["saved"] for p in parts if p["saved"]), None)
    return rows, saved, [p["timing"] for p in parts]


# ---------------------------------------------------------------------------------------------
# all of it

def read_inputs(cfg):
    """The trajectory, the stored post-hoc profiles (None unless phema reads them) and the
    settings of the sweep, every check of the input done."""
    trajectory = Trajectory(cfg)
    check_burn_in_steps(cfg, trajectory.steps)
    stored = None
    if "phema" in parse_methods(cfg.methods) and cfg.phema_source != "snapshots":
        stored = find_stored_profiles(profile_directories(cfg), trajectory.model_args,
                                      cfg.posthoc_profiles, trajectory.skip)
        check_profiles_run(cfg, trajectory, stored)
    first, _ = trajectory.first()   # the first checkpoint that loads: the default burn-in
    settings = expand_settings(cfg, first_step=first.step, stored=stored)
    check_save_choice(cfg, settings)
    return trajectory, stored, settings


def average(cfg):
    """Run the pass; write results.csv/json and plot.png; return the summary (rows, best
    settings, skipped files, time per phase, and this process's final averagers). Under
    torchrun every process returns; rank 0 writes the outputs and its summary has every row."""
    # the process group first: on several nodes a file that one node cannot read fails there
    # alone, and agree() stops every rank with its message instead of leaving the others waiting
    with init_runtime(cfg.device, cfg.dtype) as runtime:
        trajectory, stored, settings = agree(runtime, lambda: read_inputs(cfg), SAME_FILES)
        # the data the checkpoints trained on unless told otherwise, of their vocabulary
        data = agree(runtime, lambda: open_checkpoint_data(trajectory.first()[1], cfg.dataset,
                                                           cfg.data_dir), SAME_FILES)
        with claimed_results(cfg, runtime) as results:
            plan = make_plan(cfg, settings, trajectory, stored, runtime)
            check_profile_coverage(cfg, settings, stored, plan.eval_steps, runtime)
            part = one_pass(cfg, runtime, data, trajectory, plan, stored, results.staging)
            rows, saved, timing = gather_rows(part, runtime)
            summary = {"rows": rows, "best": best_settings(rows), "posthoc": posthoc_widths(rows),
                       "skipped": trajectory.skipped, "saved": saved, "timing": timing,
                       "averagers": part["averagers"], "data_dir": str(data.dir),
                       "files": [{"file": f.path.name, "step": f.step} for f in trajectory.files]}
            if runtime.master:
                if saved and "error" in saved:
                    raise CheckpointError(saved["error"])
                summary["ignored"] = [p.name for p in trajectory.ignored]
                write_results(cfg, summary, results.staging)
                results.commit()   # the set replaces the old one (if any) as one
    if not runtime.master:
        return summary
    print(format_table(summary["best"]))
    if summary["posthoc"]:
        print(format_posthoc_table(summary["posthoc"]))
    print(format_times(summary["timing"]))
    if trajectory.skipped:
        print(f"skipped {len(trajectory.skipped)} file(s): " +
              "; ".join(f"{s['file']} ({s['reason'][:80]})" for s in trajectory.skipped))
    if saved:
        print(f"saved {saved['label']} at step {saved['step']} to {saved['path']}")
    return summary


# ---------------------------------------------------------------------------------------------
# results

def select_batches(cfg, block_size):
    """The held-out val batches that choose among settings (None: choose on the reported ones):
    drawn with seed + 1, so a choice is never judged on the batches that choose it."""
    n = cfg.eval_iters if cfg.select_iters is None else cfg.select_iters
    return EvalBatches(n, cfg.batch_size, block_size, cfg.seed + 1) if n else None


def _choice_loss(row):
    """The loss a choice among settings goes by: the held-out one where it was measured."""
    return row["val_loss"] if row.get("select_loss") is None else row["select_loss"]


def best_settings(rows):
    """Per method (and source: a phema from the stored profiles is its own entry), the setting
    chosen at the last evaluated step (the lowest loss on the held-out batches where they were
    evaluated, else on the reported ones), its val loss and gain over the raw weights there on
    the reported batches, and the lowest reported loss it reaches at any step."""
    last = max(r["step"] for r in rows)
    raw = {r["step"]: r["val_loss"] for r in rows if r["method"] == "raw"}
    best = []
    for method, source in dict.fromkeys((r["method"], r["source"]) for r in rows):
        at_last = [r for r in rows if r["method"] == method and r["source"] == source
                   and r["step"] == last]
        if not at_last:
            continue
        top = min(at_last, key=lambda r: _loss_order(r, _choice_loss(r)))
        curve = [r for r in rows if r["setting"] == top["setting"]]
        lowest = min(curve, key=_loss_order)
        best.append({"method": method, "source": source, "setting": top["setting"],
                     "step": last, "val_loss": top["val_loss"],
                     "chosen_on": "reported batches" if top.get("select_loss") is None
                     else "held-out batches", "select_loss": top.get("select_loss"),
                     "gain": raw[last] - top["val_loss"] if last in raw else None,
                     "lowest": lowest["val_loss"], "lowest_step": lowest["step"]})
    return best


def _loss_order(row, loss=None):
    """Lowest loss first (the row's val loss unless `loss` is given), non-finite losses last."""
    loss = row["val_loss"] if loss is None else loss
    return (not math.isfinite(loss), loss)


def posthoc_widths(rows):
    """Every phema reconstructed from the stored profiles at the last evaluated step: its val
    loss, gain over raw, and the relative error of its weight profile."""
    last = max(r["step"] for r in rows)
    raw = {r["step"]: r["val_loss"] for r in rows if r["method"] == "raw"}
    return [{"setting": r["setting"], "step": last, "val_loss": r["val_loss"],
             "gain": raw[last] - r["val_loss"] if last in raw else None,
             "reconstruction_error": r["reconstruction_error"]}
            for r in rows if r["source"] == "profiles" and r["step"] == last]


def method_label(b):
    """A best-settings entry's method, with its source where it is not the snapshots."""
    return b["method"] if b["source"] == "snapshots" else f"{b['method']} ({b['source']})"


def format_table(best):
    table = markdown_table(best, [
        ("method", method_label), ("best setting", "setting"),
        ("val loss", lambda b: f"{b['val_loss']:.4f}"),
        ("gain over raw", lambda b: "" if b["method"] == "raw" or b["gain"] is None
         else f"{b['gain']:+.4f}"),
        ("lowest (step)", lambda b: f"{b['lowest']:.4f} ({b['lowest_step']})")])
    held_out = any(b.get("chosen_on") == "held-out batches" for b in best)
    return table + ("\nbest setting: chosen on held-out val batches (select_iters, seed + 1); "
                    "the losses are on the reported batches" if held_out else
                    "\nbest setting: chosen on the reported batches themselves (select_iters=0)")


def format_posthoc_table(widths):
    return f"post-hoc EMA from the stored profiles, step {widths[0]['step']}:\n" + markdown_table(
        widths, [("setting", "setting"), ("val loss", lambda b: f"{b['val_loss']:.4f}"),
                 ("gain over raw", lambda b: "" if b["gain"] is None else f"{b['gain']:+.4f}"),
                 ("profile error", lambda b: f"{b['reconstruction_error']:.2e}")])


def format_times(timing):
    """'time: read 1.2 s, average 3.4 s, evaluate 5.6 s' (per rank under torchrun)."""
    def line(t):
        return ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in t.items())
    if len(timing) == 1:
        return f"time: {line(timing[0])}"
    return "time per process: " + "; ".join(f"rank {r}: {line(t)}" for r, t in enumerate(timing))


CSV_COLUMNS = ["step", "tokens", "method", "setting", "source", "hparams", "val_loss",
               "reconstruction_error", "select_loss"]


def write_results(cfg, summary, directory=None):
    """results.csv, results.json (the set's record) and plot.png into `directory` (the
    staging folder of claimed_results; default out_dir)."""
    out = Path(directory or cfg.out_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS +
                            (list(EMBEDDING_COLUMNS) if cfg.embeddings else []))
    writer.writeheader()
    writer.writerows(summary["rows"])
    for s in summary["skipped"]:
        writer.writerow({"step": s["step"], "method": "skipped", "setting": s["file"],
                         "hparams": s["reason"], "val_loss": math.nan})
    atomic_write(out / "results.csv", buffer.getvalue())
    record = {k: v for k, v in summary.items() if k != "averagers"}
    record["config"] = dataclasses.asdict(cfg)
    atomic_write(out / "results.json", json.dumps(record, indent=1))
    if cfg.plot:
        plot(summary, out / "plot.png", cfg)


def plot(summary, path, cfg):
    """Val loss vs step (or tokens): the raw weights, the best setting of each method and every
    phema width reconstructed from the stored profiles, with the gain of each over the raw
    weights below; the run and the data in the title."""
    x = "tokens" if cfg.plot_x == "tokens" else "step"
    shown = list(dict.fromkeys([b["setting"] for b in summary["best"]] +
                               [w["setting"] for w in summary["posthoc"]]))
    curves = {label: [(r[x], r["val_loss"]) for r in summary["rows"]
                      if r["setting"] == label and r[x] is not None]
              for label in shown}
    steps = [f["step"] for f in summary["files"]]
    data = summary["data_dir"]
    title = (f"{cfg.ckpt_dir}: {len(steps)} checkpoints, steps {steps[0]}..{steps[-1]}; val loss "
             f"on {data} ({cfg.eval_iters} batches)\nraw weights vs the best setting of each "
             f"method at the last step" +
             (" and every post-hoc phema width" if summary["posthoc"] else ""))
    return plot_curves(curves, path, title, xlabel="tokens seen" if x == "tokens" else "step")
