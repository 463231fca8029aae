"""
Learning-rate schedules as pure functions of the step.

    lr used at step s = peak_lr * schedule(s)        (lr_at(s, peak_lr, schedule))

The multiplier depends on the step alone, so resuming needs only the step (torchtitan style): there
is no scheduler state to save. Steps count from 0; a run with max_iters=N executes steps 0..N-1.

    constant  warmup, then 1
    cosine    warmup, then a half cosine from 1 down to min_lr_frac at lr_decay_iters (nanoGPT),
              then min_lr_frac
    wsd       warmup-stable-decay (Hägele et al. 2024, arXiv 2405.18392): warmup, hold 1, then a
              cooldown from 1 at step c to final_lr_frac at step max_iters, then final_lr_frac

Warmup, shared by all three: mult = (step + 1) / (warmup_iters + 1) for step < warmup_iters, as in
nanoGPT, so step 0 already has a non-zero LR and step warmup_iters is the first at the peak.

WSD cooldown. c = cooldown_start if given, else max_iters - int(cooldown_frac * max_iters): the
cooldown length truncated to whole steps, as in the authors' wsd_schedule (epfml/schedules-and-
scaling), so that a run with the same max_iters and fraction cools down from the same step there.
For c <= step < max_iters, with x = (step - c) / (max_iters - c) in [0, 1):

    mult = final_lr_frac + (1 - final_lr_frac) * f(x)
    f(x) = 1 - x                      linear
           0.5 * (1 + cos(pi * x))    cosine
           1 - sqrt(x)                1-sqrt   (the paper's recommended shape)
           1 - x**2                   square   (the paper's "square"; decay_type="square" in the
                                                authors' code, epfml/schedules-and-scaling)

Step c itself is still at the peak (x = 0), and the end value is reached at step max_iters
(x = 1), which the run does not execute: its last step, max_iters - 1, trains at
f((max_iters - 1 - c) / (max_iters - c)) > 0 even with final_lr_frac = 0, so that no step is wasted
on a zero LR. This is also the convention of the authors' code.

Branching a cooldown off a constant-LR run at a saved step k (the Hägele workflow):
    python train.py --init_from=out/const/ckpt_<k>.pt --lr_schedule=wsd --cooldown_start=<k> \
        --max_iters=<end> --out_dir=<new dir>
Any warmup_iters <= k is fine: the branch starts at step k, past the warmup.
"""

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "cosine", "wsd")
COOLDOWN_SHAPES = ("linear", "cosine", "1-sqrt", "square")


def _cooldown_shape(shape, x):
    """f(x): 1 at the start of the cooldown (x=0), 0 at its end (x=1)."""
    if shape == "linear":
        return 1.0 - x
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * x))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(x)
    if shape == "square":
        return 1.0 - x * x
    raise ValueError(f"cooldown_shape={shape!r} is unknown; use one of {COOLDOWN_SHAPES}")


@dataclass(frozen=True)
class LRSchedule:
    """Multiplier of the peak LR as a function of the step; see the module docstring for the math.

    Fields used by each schedule: all use name, max_iters, warmup_iters; cosine adds lr_decay_iters
    and min_lr_frac; wsd adds cooldown_frac or cooldown_start, cooldown_shape and final_lr_frac.
    The others are checked for range but ignored.
    """
    name: str                          # 'constant' | 'cosine' | 'wsd'
    max_iters: int                     # total length of the run (steps 0..max_iters-1)
    warmup_iters: int = 0
    # cosine
    lr_decay_iters: int | None = None  # the cosine reaches min_lr_frac here (None: max_iters)
    min_lr_frac: float = 0.1           # floor of the cosine, as a fraction of the peak
    # wsd
    cooldown_frac: float = 0.2         # cooldown over the last 20% of max_iters ...
    cooldown_start: int | None = None  # ... or from this step (wins over cooldown_frac)
    cooldown_shape: str = "1-sqrt"     # 'linear' | 'cosine' | '1-sqrt' | 'square'
    final_lr_frac: float = 0.0         # multiplier reached at step max_iters

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"name={self.name!r} (--lr_schedule) is unknown; "
                             f"use one of {SCHEDULES}")
        for key in ("max_iters", "warmup_iters", "lr_decay_iters", "cooldown_start"):
            value = getattr(self, key)
            if value is None and key in ("lr_decay_iters", "cooldown_start"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{key}={value!r} must be an integer number of steps")
            if value < 0 or (key == "max_iters" and value == 0):
                bound = "> 0" if key == "max_iters" else ">= 0"
                raise ValueError(f"{key}={value} must be {bound}")
        for key in ("min_lr_frac", "cooldown_frac", "final_lr_frac"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:  # also rejects NaN
                raise ValueError(f"{key}={value} must be a fraction in [0, 1]")
        if self.cooldown_shape not in COOLDOWN_SHAPES:
            raise ValueError(f"cooldown_shape={self.cooldown_shape!r} is unknown; "
                             f"use one of {COOLDOWN_SHAPES}")

        if self.name == "cosine" and self.warmup_iters >= self.decay_end:
            end = "lr_decay_iters" if self.lr_decay_iters is not None else "max_iters"
            raise ValueError(f"warmup_iters={self.warmup_iters} must be below {end}="
                             f"{self.decay_end}: the cosine decays from the end of the warmup to "
                             f"{end}; lower warmup_iters too, e.g. --warmup_iters="
                             f"{self.decay_end // 10} (a tenth of the run), or raise --{end}")
        if self.name == "wsd":
            if self.cooldown_start is not None:
                if not self.warmup_iters <= self.cooldown_start <= self.max_iters:
                    raise ValueError(
                        f"cooldown_start={self.cooldown_start} must lie in [warmup_iters, "
                        f"max_iters] = [{self.warmup_iters}, {self.max_iters}]; for a branched "
                        f"cooldown pass the loaded step and set --max_iters past it")
            elif self.cooldown_begin < self.warmup_iters:
                raise ValueError(
                    f"cooldown_frac={self.cooldown_frac} puts the cooldown start at step "
                    f"{self.cooldown_begin}, inside the warmup (warmup_iters={self.warmup_iters}); "
                    f"lower --cooldown_frac or --warmup_iters, or set --cooldown_start")

    @property
    def decay_end(self):
        """cosine: the step at which the multiplier reaches min_lr_frac."""
        return self.max_iters if self.lr_decay_iters is None else self.lr_decay_iters

    @property
    def cooldown_begin(self):
        """wsd: the step c at which the cooldown starts (still at the peak there)."""
        if self.cooldown_start is not None:
            return self.cooldown_start
        # truncated as the authors' wsd_schedule does (int of the float product, so 0.29 * 100
        # gives 28 steps); an explicit cooldown_start avoids any doubt
        return self.max_iters - int(self.cooldown_frac * self.max_iters)

    def __call__(self, step: int) -> float:
        """Multiplier of the peak LR for the optimizer step `step` (0-based)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        if step < self.warmup_iters:
            return (step + 1) / (self.warmup_iters + 1)
        if self.name == "constant":
            return 1.0
        if self.name == "cosine":
            if step > self.decay_end:
                return self.min_lr_frac
            ratio = (step - self.warmup_iters) / (self.decay_end - self.warmup_iters)
            coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
            return self.min_lr_frac + coeff * (1.0 - self.min_lr_frac)
        # wsd; checked first so that a zero-length cooldown (c == max_iters) never divides by 0
        if step >= self.max_iters:
            return self.final_lr_frac
        c = self.cooldown_begin
        if step < c:
            return 1.0
        x = (step - c) / (self.max_iters - c)
        f = _cooldown_shape(self.cooldown_shape, x)
        return self.final_lr_frac + (1.0 - self.final_lr_frac) * f


def lr_at(step, peak_lr, schedule):
    """The LR used at `step`: peak_lr * schedule(step)."""
    return peak_lr * schedule(step)


def from_config(cfg):
    """LRSchedule from a training config (train.TrainConfig or anything with the same attributes).

    The config gives the cosine floor in absolute terms (min_lr, nanoGPT's key); the schedule takes
    it relative to the peak, min_lr_frac = min_lr / learning_rate. min_lr is checked only for the
    cosine, the one schedule that uses it, so sweeping learning_rate of a wsd run below the default
    min_lr does not fail. Errors name the config keys.
    """
    if not cfg.learning_rate > 0:
        raise ValueError(f"learning_rate={cfg.learning_rate} must be > 0 (it is the peak LR)")
    kwargs = {}
    if cfg.lr_schedule == "cosine":
        if not 0 <= cfg.min_lr <= cfg.learning_rate:
            raise ValueError(f"min_lr={cfg.min_lr} must lie in [0, learning_rate="
                             f"{cfg.learning_rate}]: it is the floor of the cosine; lower --min_lr")
        kwargs["min_lr_frac"] = cfg.min_lr / cfg.learning_rate
    return LRSchedule(name=cfg.lr_schedule, max_iters=cfg.max_iters, warmup_iters=cfg.warmup_iters,
                      lr_decay_iters=cfg.lr_decay_iters, cooldown_frac=cfg.cooldown_frac,
                      cooldown_start=cfg.cooldown_start, cooldown_shape=cfg.cooldown_shape,
                      final_lr_frac=cfg.final_lr_frac, **kwargs)


def plot(schedules, path, steps=None):
    """Plot {label: LRSchedule} multipliers over steps 0..max(max_iters) (or `steps`) to `path`."""
    from matplotlib.figure import (
        Figure,  # lazy: training never needs matplotlib; no pyplot state
    )

    steps = steps or max(s.max_iters for s in schedules.values()) + 1
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for label, schedule in schedules.items():
        ax.plot(range(steps), [schedule(s) for s in range(steps)], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("LR / peak LR")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
