"""
Weight averaging along the training trajectory: the one implementation of the math in
docs/averaging.md, shared by the online averagers of train.py (online_averaging.py) and the
offline tool over saved snapshots (average.py).

Two layers:
  1. pure functions over flat float32 state tensors (1-D, one entry per parameter): the update
     rules (`ema_update_`, `bema_step_`, `dema_step_`, `ouema_update_`, `running_mean_update_`)
     and the schedules as functions of t (`bema_beta`, `bema_alpha`, `ema_warmup_decay`,
     `ouema_a`). θ may be float32 or bfloat16; it is upcast, state is always float32 (1/t-sized
     increments are below bf16 resolution). A fused kernel (wagpt/kernels/) replaces exactly one of
     these functions and is tested against the same float64 reference.
  2. one class per method behind the `Averager` interface, registered in AVERAGERS by name. A
     class's `defaults` dict is the complete, literal list of its hyperparameters (each key
     prefixed with the method's name, so a key always says which method it tunes); train.py and
     average.py make their config keys, --help and sweeps from it, and README's method table is
     checked against it.

Adding a method: write a class (name, defaults, start_key, freq_key, buffers/counters, and
_validate/_init/_update/average), decorate it with @register, and test it against a float64
reference. README.md, "Add an averaging method", has the steps.

Conventions (docs/averaging.md; pinned by tests/test_averaging.py):
- Time. s counts optimizer updates applied: θ_0 is the initial model, θ_s the weights after s
  updates (train.py's iter_num, the number in ckpt_<s>.pt and snapshots/step_<s>). An averager
  with burn-in τ (start_key) and period φ (freq_key) acts at s = τ, τ+φ, τ+2φ, ... and ignores
  every other step. At s = τ it initialises from a copy of θ_τ; at later acting steps it uses
  t = s − τ (so t = φ, 2φ, ...).
- An averager must see its initialisation step: its first acting call must be s = τ, and after
  that every acting step in order (s = previous + φ), else RuntimeError; this keeps an offline
  replay from silently computing a different average than the online run. The offline tool,
  which only has the saved snapshots, builds averagers with allow_gaps=True: acting steps may
  then be skipped (the average is over the snapshots there are), but still come in order.
- Offline time. With fill_gaps=True (average.py's default, offline_time='steps') a snapshot
  after a gap stands for every acting step since the previous one, each with the snapshot's θ:
  the gap gets the updates the online averager would have made (an EMA's decay d becomes d^n
  over n acting steps), in one pass where a method has the closed form (_update_gap). Exact when
  θ is constant between snapshots; docs/averaging.md gives each method's bound. Without it
  (offline_time='snapshots') each snapshot is one update.
- average() is None before initialisation. Otherwise a float32 tensor that may be the averager's
  own buffer: read it, do not modify it; clone it to keep it past the next update().
- state_dict() holds only tensors and python numbers (torch.load(weights_only=True) works);
  loading it and continuing is bitwise identical to never stopping. Hyperparameters must match.
"""

import math
from abc import ABC, abstractmethod

import torch

from wagpt import kernels

# ---------------------------------------------------------------------------- schedules (pure)

def bema_beta(t, ema_power, lag, multiplier, min_ema_multiplier=0.0):
    """EMA weight β_t = max((ρ + γt)^(−κ), β_min); ema_power κ < 0 disables the EMA: β_t = 1."""
    if ema_power < 0:
        return 1.0
    return max((lag + multiplier * t) ** -ema_power, min_ema_multiplier)


def bema_alpha(t, bias_power, lag, multiplier):
    """Bias-correction weight α_t = (ρ + γt)^(−η); bias_power η < 0 disables it (α_t = 0).
    η = 0 is NOT off: it is α_t = 1, full correction."""
    if bias_power < 0:
        return 0.0
    return (lag + multiplier * t) ** -bias_power


def ema_warmup_decay(t, decay, power, gamma):
    """timm ModelEmaV3's warmup: d_t = min(d, 1 − (1 + t/γ_w)^(−p)); d_0 = 0. timm's t is its
    step − update_after_step − 1, i.e. ours with ema_update_after = its update_after_step + 1."""
    return min(decay, 1.0 - (1.0 + t / gamma) ** -power)


def ouema_a(t, bias_power, lag, multiplier):
    """OUEMA pull-back weight a_t = b_t^(−η) on β_t's time base b_t = ρ + γt (one base for both,
    as in the BEMA authors' tool); < 1 whenever b_t > 1 and η > 0."""
    return (lag + multiplier * t) ** -bias_power


# ---------------------------------------------------------------------- update rules (pure)
# All take flat float32 state tensors, θ float32 or bfloat16, and python floats; state in place.

def _f32(theta):
    return theta if theta.dtype == torch.float32 else theta.float()


def ema_update_(ema, theta, beta):
    """ema ← (1 − β)·ema + β·θ, computed as ema + β·(θ − ema) (torch.lerp)."""
    if kernels.use_triton(ema):
        return kernels.triton_ops().ema_update_(ema, theta, beta)
    return ema.lerp_(_f32(theta), beta)


def bema_output(ema, theta, theta0, alpha, out):
    """out ← ema + α·(θ − θ₀)."""
    torch.sub(_f32(theta), theta0, out=out)
    return out.mul_(alpha).add_(ema)


def bema_step_(ema, theta, theta0, beta, alpha, out):
    """One BEMA update: ema ← lerp(ema, θ, β), then out ← ema + α·(θ − θ₀) (the fused kernel)."""
    if kernels.use_triton(ema):
        return kernels.triton_ops().bema_step_(ema, theta, theta0, beta, alpha, out)
    ema_update_(ema, theta, beta)
    return bema_output(ema, theta, theta0, alpha, out)


def dema_step_(e1, e2, theta, beta, out=None):
    """e1 ← lerp(e1, θ, β); e2 ← lerp(e2, e1_new, β); out ← 2·e1 − e2 if out is given."""
    if kernels.use_triton(e1):
        return kernels.triton_ops().dema_step_(e1, e2, theta, beta, out)
    ema_update_(e1, theta, beta)
    e2.lerp_(e1, beta)
    if out is not None:
        dema_output(e1, e2, out)
    return out


def dema_output(e1, e2, out):
    torch.mul(e1, 2.0, out=out)
    return out.sub_(e2)


def ouema_update_(ema, theta, theta0, a, beta):
    """ema ← lerp(ema, θ̃, β) with θ̃ = (θ − a·θ₀)/(1 − a)."""
    if kernels.use_triton(ema):
        return kernels.triton_ops().ouema_update_(ema, theta, theta0, a, beta)
    tilde = torch.add(_f32(theta), theta0, alpha=-a).div_(1.0 - a)
    return ema.lerp_(tilde, beta)


def running_mean_update_(mean, theta, n):
    """mean ← mean + (θ − mean)/n: the mean of n samples given that of the first n − 1."""
    if kernels.use_triton(mean):
        return kernels.triton_ops().running_mean_update_(mean, theta, n)
    return mean.lerp_(_f32(theta), 1.0 / n)


def mean_of_rows(rows):
    """The mean of the rows of a (k, n) tensor, summed row after row and divided by k: every
    entry sees the same operations in the same order whatever n is, so the mean over a slice of
    the columns equals that slice of the mean bit for bit (host-state chunks, DDP shards).
    torch's mean(dim=0) does not promise that: its reduction order depends on n."""
    total = rows[0].clone()
    for row in rows[1:]:
        total += row
    return total.div_(rows.shape[0])


# ------------------------------------------------------------------- hyperparameter checks

def _int(hp, key, minimum):
    v = hp[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{key}={v!r}: must be an integer >= {minimum}")
    return v


def _real(hp, key, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False, why=""):
    v = hp[key]
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if ok:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{key}={v!r}: must be a finite number in {rng}{why}")
    return float(v)


def _check_b(hp, prefix, phi):
    """b_t = ρ + γt must be >= 1 at every acting t >= φ, so that β_t <= 1 (no extrapolation),
    α_t <= 1, and OUEMA's a_t < 1."""
    lag = _real(hp, f"{prefix}_lag", 0.0)
    mult = _real(hp, f"{prefix}_multiplier", 0.0)
    if lag + mult * phi < 1:
        raise ValueError(f"{prefix}_lag={lag} with {prefix}_multiplier={mult} and "
                         f"{prefix}_update_freq={phi}: need lag + multiplier*update_freq >= 1 "
                         f"(b_t = lag + multiplier*t below 1 gives an EMA weight beta_t > 1)")
    return lag, mult


# -------------------------------------------------------------------------------- interface

class Averager(ABC):
    """Online average of the flat parameter vector. Subclasses set the class attributes and
    implement _validate, _init, _update, average."""
    name = ""
    defaults = {}       # config key -> default value: the complete set of hyperparameters
    start_key = ""      # the key holding τ (burn-in)
    freq_key = ""       # the key holding φ (period)
    buffers = ()        # names of float32 tensor attributes that form the state
    counters = ()       # names of int attributes that form the state
    optional_keys = {}  # key -> type T of the keys that take None besides values of type T
    period_is_part_of_estimate = False   # True: the period changes the average, not only how
    # often it is read (BEMA: its schedules count steps); average.py then keeps its default

    def __init__(self, allow_gaps=False, fill_gaps=False, **hparams):
        self.allow_gaps = allow_gaps
        self.fill_gaps = fill_gaps   # offline: a gap counts the acting steps it spans
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a hyperparameter of averager {self.name!r}; "
                             f"its keys are {', '.join(self.defaults)}")
        self.hparams = {**self.defaults, **hparams}
        self.tau = _int(self.hparams, self.start_key, 0)
        self.phi = _int(self.hparams, self.freq_key, 1)
        self._validate(self.hparams)
        self.step = None    # the last step at which this averager acted
        self.numel = None
        for b in self.buffers:
            setattr(self, b, None)
        for c in self.counters:
            setattr(self, c, 0)

    def update(self, step, theta):
        """Call after every optimizer step s with θ_s (flat, float32 or bf16). Returns whether it
        acted (s = τ + jφ). θ is only read during the call: training may mutate it afterwards.
        Offline with fill_gaps, a snapshot between acting steps stands for the acting steps since
        the previous snapshot, τ included (θ held since then), so snapshots need not fall on
        acting steps."""
        if step < self.tau:
            return False
        if (step - self.tau) % self.phi:
            if not self.fill_gaps:
                return False
            step = self.tau + (step - self.tau) // self.phi * self.phi
            if self.step is not None and step <= self.step:
                return False
        if theta.dim() != 1 or theta.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"{self.name}: theta must be a flat float32/bfloat16 tensor, got "
                             f"shape {tuple(theta.shape)} dtype {theta.dtype}")
        with torch.no_grad():
            if self.step is None:
                if step != self.tau and not self.fill_gaps:
                    raise RuntimeError(
                        f"{self.name}: first update at step {step}, but it initialises at "
                        f"{self.start_key}={self.tau}; load its state_dict to continue a run, or "
                        f"set {self.start_key}={step}")
                self.numel = theta.numel()
                self._init(theta.detach())   # at τ (offline: θ held since τ)
                self.step = self.tau
                if step == self.tau:
                    return True
            elif step <= self.step if self.allow_gaps else step != self.step + self.phi:
                raise RuntimeError(f"{self.name}: update at step {step} after step "
                                   f"{self.step}; expected step {self.step + self.phi} "
                                   f"({self.freq_key}={self.phi})")
            if theta.numel() != self.numel:
                raise ValueError(f"{self.name}: theta has {theta.numel()} entries, the "
                                 f"state {self.numel}")
            t, t_prev = step - self.tau, self.step - self.tau
            if self.fill_gaps and t - t_prev > self.phi:
                self._update_gap(t_prev, t, theta.detach())
            else:
                self._update(t, theta.detach())
        self.step = step
        return True

    @abstractmethod
    def _validate(self, hp): ...

    @abstractmethod
    def _init(self, theta): ...

    @abstractmethod
    def _update(self, t, theta): ...

    @abstractmethod
    def average(self):
        """The averaged weights (float32, read-only, valid until the next update), or None
        before initialisation."""

    def _update_gap(self, t_prev, t, theta):
        """Offline with fill_gaps: the online updates of every acting step in (t_prev, t], each
        with θ (the snapshot stands for the steps since the previous one). By default one
        _update per acting step; a method overrides it with its closed form (one pass over the
        weights), or with one _update where a snapshot is one sample by definition (lawa, wa)
        or its update already spans the gap (phema)."""
        for u in self._acting(t_prev, t):
            self._update(u, theta)

    def _acting(self, t_prev, t):
        return range(t_prev + self.phi, t + 1, self.phi)

    def state_dict(self):
        return {"method": self.name, "hparams": dict(self.hparams),
                "step": -1 if self.step is None else self.step,
                "numel": -1 if self.numel is None else self.numel,
                "tensors": {b: getattr(self, b) for b in self.buffers
                            if getattr(self, b) is not None},
                "counters": {c: getattr(self, c) for c in self.counters}}

    def load_state_dict(self, sd):
        if sd["method"] != self.name:
            raise ValueError(f"state_dict is of averager {sd['method']!r}, not {self.name!r}")
        for k, v in sd["hparams"].items():
            if self.hparams.get(k) != v:
                raise ValueError(f"{k}={self.hparams.get(k)!r} but the saved averager used "
                                 f"{k}={v!r}; resume with the saved value")
        self.step = None if sd["step"] < 0 else sd["step"]
        self.numel = None if sd["numel"] < 0 else sd["numel"]
        for b in self.buffers:
            t = sd["tensors"].get(b)
            setattr(self, b, None if t is None else t.to(torch.float32).clone())
        for c in self.counters:
            setattr(self, c, int(sd["counters"][c]))

    def memory_bytes(self):
        return sum(getattr(self, b).nbytes for b in self.buffers if getattr(self, b) is not None)

    def state_copies(self):
        """How many float32 copies of the weights the state holds once initialised (for memory
        estimates before any is allocated): one per buffer unless a method says otherwise."""
        return len(self.buffers)

    def swapped_in(self, flat):
        """`with averager.swapped_in(flat): evaluate(model)`: the model whose weights are the
        FlatParameters `flat` holds this average inside the block; the live weights are restored
        bitwise after it. (Under DDP, OnlineAveraging.swapped_in gathers the shards first.)"""
        averaged = self.average()
        if averaged is None:
            raise RuntimeError(f"{self.name} has no average yet: it starts at "
                               f"{self.start_key}={self.tau}")
        return flat.swapped(averaged)


def _copy(theta):
    return theta.to(torch.float32, copy=True)


AVERAGERS = {}   # method name -> class: the registry, the one list of methods


def register(cls):
    """Class decorator: make an Averager subclass a method of train.py and average.py."""
    if not (isinstance(cls, type) and issubclass(cls, Averager)):
        raise TypeError(f"{cls!r} is not an Averager subclass")
    if not cls.name or cls.name in AVERAGERS or cls.name == "all":
        raise ValueError(f"averager name {cls.name!r} is empty, reserved or already registered")
    for key in cls.defaults:
        if not key.startswith(cls.name + "_"):
            raise ValueError(f"{cls.__name__}.defaults key {key!r} must start with "
                             f"'{cls.name}_' (every key says which method it tunes)")
    for key in (cls.start_key, cls.freq_key):
        if key not in cls.defaults:
            raise ValueError(f"{cls.__name__}: {key!r} (start_key/freq_key) is not in defaults")
    AVERAGERS[cls.name] = cls
    return cls


# ---------------------------------------------------------------------------------- methods

@register
class EMA(Averager):
    """Exponential moving average, optionally with timm's warmup of the decay."""
    name = "ema"
    defaults = {
        "ema_decay": 0.999,          # d: e ← d·e + (1 − d)·θ
        "ema_warmup": False,         # decay d_t = min(d, 1 − (1 + t/γ_w)^(−p)) if True
        "ema_warmup_power": 2 / 3,   # p of the warmup
        "ema_warmup_gamma": 1.0,     # γ_w of the warmup
        "ema_update_after": 1,       # τ: e starts as θ_τ; 1 = timm ModelEmaV3's phase
        "ema_update_freq": 1,        # φ: acts every φ steps
    }
    start_key, freq_key, buffers = "ema_update_after", "ema_update_freq", ("e",)

    def _validate(self, hp):
        self.decay = _real(hp, "ema_decay", 0.0, 1.0, hi_open=True)
        if not isinstance(hp["ema_warmup"], bool):
            raise ValueError(f"ema_warmup={hp['ema_warmup']!r}: must be True or False")
        self.warmup = hp["ema_warmup"]
        self.warmup_power = _real(hp, "ema_warmup_power", 0.0, lo_open=True)
        self.warmup_gamma = _real(hp, "ema_warmup_gamma", 0.0, lo_open=True)

    def decay_at(self, t):
        if self.warmup:
            return ema_warmup_decay(t, self.decay, self.warmup_power, self.warmup_gamma)
        return self.decay

    def _init(self, theta):
        self.e = _copy(theta)

    def _update(self, t, theta):
        ema_update_(self.e, theta, 1.0 - self.decay_at(t))

    def _update_gap(self, t_prev, t, theta):   # n updates of θ: the decays multiply
        keep = math.prod(self.decay_at(u) for u in self._acting(t_prev, t))
        ema_update_(self.e, theta, 1.0 - keep)

    def average(self):
        return self.e


class _PowerSchedule(Averager):
    """Shared by BEMA, DEMA, OUEMA: the β_t schedule of the keys <name>_ema_power, _lag,
    _multiplier and _min_ema_multiplier."""

    def _validate(self, hp):
        p = self.name
        self.ema_power = _real(hp, f"{p}_ema_power")
        self.lag, self.multiplier = _check_b(hp, p, self.phi)
        self.min_ema_multiplier = _real(hp, f"{p}_min_ema_multiplier", 0.0, 1.0)

    def beta_at(self, t):
        return bema_beta(t, self.ema_power, self.lag, self.multiplier, self.min_ema_multiplier)

    def keep_over(self, t_prev, t):
        """Π (1 − β_u) over the acting steps u in (t_prev, t]: what is left of the EMA of
        t_prev after n updates with one θ (the rest, 1 − Π, is θ's weight)."""
        return math.prod(1.0 - self.beta_at(u) for u in self._acting(t_prev, t))


@register
class BEMA(_PowerSchedule):
    """Bias-corrected EMA (Block & Zhang 2025): a power-schedule EMA plus α_t·(θ − θ₀)."""
    name = "bema"
    defaults = {
        "bema_ema_power": 0.5,            # κ: β_t = max((ρ + γt)^(−κ), β_min); < 0: no EMA
        "bema_bias_power": 0.2,           # η: correction α_t = (ρ + γt)^(−η); < 0: off (0 is full)
        "bema_lag": 10.0,                 # ρ
        "bema_multiplier": 1.0,           # γ, b_t = ρ + γ·t
        "bema_min_ema_multiplier": 0.0,   # β_min
        "bema_update_after": 0,           # τ: burn-in step, θ₀ = e = θ_τ
        "bema_update_freq": 400,          # φ: acts every φ steps, t still counted in steps
                                          # (the authors' and TRL's default; part of the
                                          # estimator: the EMA's window grows ~φ-fold)
    }
    start_key, freq_key = "bema_update_after", "bema_update_freq"
    period_is_part_of_estimate = True
    buffers = ("theta0", "e", "out")

    def _validate(self, hp):
        super()._validate(hp)
        self.bias_power = _real(hp, "bema_bias_power")

    def alpha_at(self, t):
        return bema_alpha(t, self.bias_power, self.lag, self.multiplier)

    def state_copies(self):
        return 3 if self.bias_power >= 0 else 1

    def _init(self, theta):
        self.e = _copy(theta)
        if self.bias_power >= 0:   # with the correction off, θ₀ and out are not needed
            self.theta0 = _copy(theta)   # a copy: θ is mutated in place by the next step
            self.out = _copy(theta)      # θ'_τ = θ_τ

    def _update(self, t, theta):
        if self.out is None:
            ema_update_(self.e, theta, self.beta_at(t))
        else:
            bema_step_(self.e, theta, self.theta0, self.beta_at(t), self.alpha_at(t), self.out)

    def _update_gap(self, t_prev, t, theta):   # the EMA's n steps at once, α_t at the end
        beta = 1.0 - self.keep_over(t_prev, t)
        if self.out is None:
            ema_update_(self.e, theta, beta)
        else:
            bema_step_(self.e, theta, self.theta0, beta, self.alpha_at(t), self.out)

    def average(self):
        return self.e if self.out is None else self.out


@register
class DEMA(_PowerSchedule):
    """Double EMA 2e₁ − e₂ on BEMA's β_t schedule (Block & Zhang 2025)."""
    name = "dema"
    defaults = {
        "dema_ema_power": 0.5,            # κ in (0, 1): β_t = max((ρ + γt)^(−κ), β_min)
        "dema_lag": 10.0,                 # ρ
        "dema_multiplier": 1.0,           # γ, b_t = ρ + γ·t
        "dema_min_ema_multiplier": 0.0,   # β_min
        "dema_update_after": 0,           # τ: burn-in step, e₁ = e₂ = θ_τ
        "dema_update_freq": 1,            # φ: acts every φ steps
    }
    start_key, freq_key, buffers = "dema_update_after", "dema_update_freq", ("e1", "e2")

    def _validate(self, hp):
        super()._validate(hp)
        _real(hp, "dema_ema_power", 0.0, 1.0, lo_open=True, hi_open=True)

    def _init(self, theta):
        self.e1, self.e2 = _copy(theta), _copy(theta)

    def _update(self, t, theta):
        dema_step_(self.e1, self.e2, theta, self.beta_at(t))

    def _update_gap(self, t_prev, t, theta):
        # n steps with one θ: e₁ ← p·e₁ + (1 − p)·θ and e₂ ← p·e₂ + r·e₁ + q·θ (old e₁;
        # p + r + q = 1), composed step by step, then applied as two lerps of e₂ and one of e₁
        p, q1, r, q = 1.0, 0.0, 0.0, 0.0
        for u in self._acting(t_prev, t):
            beta = self.beta_at(u)
            p, q1 = (1 - beta) * p, (1 - beta) * q1 + beta
            r, q = (1 - beta) * r + beta * p, (1 - beta) * q + beta * q1
        if q < 1:
            ema_update_(self.e2, self.e1, r / (1 - q))
        ema_update_(self.e2, theta, q)
        ema_update_(self.e1, theta, 1 - p)

    def average(self):   # computed on demand: no third buffer in the state
        return None if self.e1 is None else dema_output(self.e1, self.e2,
                                                         torch.empty_like(self.e1))


@register
class OUEMA(_PowerSchedule):
    """Ornstein-Uhlenbeck-motivated EMA (Block & Zhang 2025) of (θ − a_t·θ₀)/(1 − a_t), with
    a_t and β_t on one time base b_t = ρ + γt. The defaults are the BEMA authors' tool's: its time
    base 1 + max(t + ρ_ref, 1) is ours with lag ρ_ref + 1, so its default ρ_ref = 1 is lag 2."""
    name = "ouema"
    defaults = {
        "ouema_ema_power": 0.5,           # κ: β_t = max(b_t^(−κ), β_min); < 0: no EMA
        "ouema_bias_power": 0.2,          # η > 0: pull-back a_t = b_t^(−η)
        "ouema_lag": 2.0,                 # ρ; b_t = ρ + γ·t must exceed 1
        "ouema_multiplier": 1.0,          # γ, b_t = ρ + γ·t
        "ouema_min_ema_multiplier": 0.0,  # β_min
        "ouema_update_after": 0,          # τ: burn-in step, θ₀ = e = θ_τ
        "ouema_update_freq": 1,           # φ: acts every φ steps
    }
    start_key, freq_key, buffers = "ouema_update_after", "ouema_update_freq", ("theta0", "e")

    def _validate(self, hp):
        super()._validate(hp)
        self.bias_power = _real(hp, "ouema_bias_power", 0.0, lo_open=True,
                                why=" (a_t = b_t^(-bias_power) must stay below 1)")
        # θ̃ divides by 1 − a_t: b_t = 1 at the first update would divide by zero, and b_t just
        # above 1 amplifies θ − θ₀ enormously
        if self.lag + self.multiplier * self.phi <= 1:
            raise ValueError(
                f"ouema_lag={self.lag} with ouema_multiplier={self.multiplier} and "
                f"ouema_update_freq={self.phi}: need lag + multiplier*update_freq > 1, so that "
                f"a_t = b_t^(-bias_power) < 1 at every update (the pull-back divides by 1 - a_t); "
                f"the authors' default is lag 2 with multiplier 1")

    def _init(self, theta):
        self.theta0, self.e = _copy(theta), _copy(theta)

    def _update(self, t, theta):
        a = ouema_a(t, self.bias_power, self.lag, self.multiplier)
        ouema_update_(self.e, theta, self.theta0, a, self.beta_at(t))

    def _update_gap(self, t_prev, t, theta):
        # n steps with one θ: e ← keep·e + c·θ − c₀·θ₀ (c − c₀ = 1 − keep), which is one
        # update with β = 1 − keep and a = c₀/c
        keep, c, c0 = 1.0, 0.0, 0.0
        for u in self._acting(t_prev, t):
            beta, a = self.beta_at(u), ouema_a(u, self.bias_power, self.lag, self.multiplier)
            keep, c, c0 = (1 - beta) * keep, (1 - beta) * c + beta / (1 - a), \
                (1 - beta) * c0 + beta * a / (1 - a)
        ouema_update_(self.e, theta, self.theta0, c0 / c, 1.0 - keep)

    def average(self):
        return self.e


@register
class SWA(Averager):
    """Uniform running mean from swa_start, every swa_freq steps (torch AveragedModel's SWA)."""
    name = "swa"
    defaults = {
        "swa_start": 0,    # τ: first sample step
        "swa_freq": 1,     # φ: steps between samples
    }
    start_key, freq_key, buffers, counters = "swa_start", "swa_freq", ("m",), ("n",)

    def _validate(self, hp):
        pass

    def _init(self, theta):
        self.m, self.n = _copy(theta), 1

    def _update(self, t, theta):
        self.n += 1
        running_mean_update_(self.m, theta, self.n)

    def _update_gap(self, t_prev, t, theta):   # n samples of one θ: weight n / count
        n = len(self._acting(t_prev, t))
        self.n += n
        ema_update_(self.m, theta, n / self.n)

    def average(self):
        return self.m


@register
class LAWA(Averager):
    """LAWA (Sanyal et al. 2024): the mean of the k latest snapshots, Δ steps apart from
    lawa_start (by default Δ: θ₀ never enters), a sliding window kept as a ring of k copies."""
    name = "lawa"
    defaults = {
        "lawa_k": 5,             # k: snapshots in the window
        "lawa_interval": 500,    # Δ (φ): steps between snapshots
        "lawa_start": None,      # τ: first snapshot step; None: Δ, the first checkpoint after
                                 # θ_0, so the initial weights never enter a window
    }
    optional_keys = {"lawa_start": int}
    start_key, freq_key, buffers, counters = "lawa_start", "lawa_interval", ("ring",), ("count",)

    def __init__(self, allow_gaps=False, **hparams):
        # the default burn-in is the period: LAWA's windows hold checkpoints Δ, 2Δ, ... (its
        # code averages checkpoint files, and nanoGPT saves none at step 0); resolved here so the
        # state and its resume check carry the step itself
        if hparams.get("lawa_start", self.defaults["lawa_start"]) is None:
            hparams["lawa_start"] = hparams.get("lawa_interval", self.defaults["lawa_interval"])
        super().__init__(allow_gaps=allow_gaps, **hparams)

    def _validate(self, hp):
        self.k = _int(hp, "lawa_k", 1)

    def state_copies(self):
        return self.k

    def _init(self, theta):
        self.ring = torch.zeros(self.k, theta.numel(), dtype=torch.float32, device=theta.device)
        self.ring[0].copy_(theta)
        self.count = 1

    def _update(self, t, theta):
        self.ring[self.count % self.k].copy_(theta)   # overwrites the oldest snapshot
        self.count += 1

    def _update_gap(self, t_prev, t, theta):   # a snapshot is one checkpoint of the window
        self._update(t, theta)

    def average(self):
        if self.ring is None:
            return None
        return mean_of_rows(self.ring[:min(self.count, self.k)])


@register
class WindowedAverage(Averager):
    """Windowed averaging (Hägele et al. 2024): the uniform mean of every wa_interval-th iterate
    in consecutive windows of wa_horizon steps; output the mean of the last wa_windows finished
    windows."""
    name = "wa"
    defaults = {
        "wa_interval": 5,      # φ: steps between samples
        "wa_horizon": 500,     # H: window length in steps (a multiple of wa_interval)
        "wa_windows": 1,       # finished windows combined in the output
        "wa_start": 1,         # τ: first sample; 1 = epfml's phase, windows (wH, (w+1)H]
    }
    start_key, freq_key = "wa_start", "wa_interval"
    buffers, counters = ("current", "finished"), ("current_n", "finished_count")

    def _validate(self, hp):
        horizon = _int(hp, "wa_horizon", 1)
        if horizon % self.phi:
            raise ValueError(f"wa_horizon={horizon} must be a multiple of "
                             f"wa_interval={self.phi}")
        self.horizon = horizon
        self.n_windows = _int(hp, "wa_windows", 1)

    def state_copies(self):
        return 1 + self.n_windows

    def _init(self, theta):
        self.finished = torch.zeros(self.n_windows, theta.numel(), dtype=torch.float32,
                                    device=theta.device)
        self.current = _copy(theta)
        self.current_n, self.finished_count = 0, 0
        self._add(0, theta)

    def _update(self, t, theta):
        # With gaps (offline) a window's last sample may be missing: the window then finishes
        # when the first sample of a later window arrives. self.step is still the previous
        # sample's step here, so the open window is the one that step fell in.
        if self.current_n and t // self.horizon != (self.step - self.tau) // self.horizon:
            self._finish_window()
        self._add(t, theta)

    def _update_gap(self, t_prev, t, theta):   # a snapshot is one sample of its window
        self._update(t, theta)

    def _add(self, t, theta):
        self.current_n += 1
        if self.current_n == 1:
            self.current.copy_(theta)
        else:
            running_mean_update_(self.current, theta, self.current_n)
        if t % self.horizon == self.horizon - self.phi:     # the window's last sample
            self._finish_window()

    def _finish_window(self):
        self.finished[self.finished_count % self.n_windows].copy_(self.current)
        self.finished_count += 1
        self.current_n = 0

    def average(self):
        if self.current is None:
            return None
        if self.finished_count == 0:
            return self.current
        return mean_of_rows(self.finished[:min(self.finished_count, self.n_windows)])


# ------------------------------------------------------- power-function EMA (Karras et al., EDM2)
# "Analyzing and Improving the Training Dynamics of Diffusion Models", CVPR 2024, section 3 and
# appendix C. posthoc.py builds the post-hoc reconstruction on these definitions.

SIGMA_REL_MAX = math.sqrt(1 / 12)   # σ_rel of γ = 0 (the uniform mean); larger widths need γ < 0


def gamma_to_sigma_rel(gamma):
    """σ_rel(γ) = sqrt((γ+1) / ((γ+2)²(γ+3))): the standard deviation of the profile
    p(x) = (γ+1)x^γ / t^(γ+1) on [0, t], divided by t (mean (γ+1)/(γ+2)·t, second moment
    (γ+1)/(γ+3)·t²). Independent of t: the profile only stretches as training goes on."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel):
    """The γ >= 0 with gamma_to_sigma_rel(γ) = σ_rel, for 0 < σ_rel <= 1/sqrt(12).
    σ_rel(γ) falls strictly on [0, ∞) and σ_rel(γ) < 1/(γ+2), so the root lies in
    [0, 1/σ_rel − 2]; bisection to the last float. (EDM2 takes the largest real root of the
    cubic γ³ + 7γ² + (16 − σ_rel⁻²)γ + 12 − σ_rel⁻² = 0, the same number.)"""
    if not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel={sigma_rel!r}: must be in (0, 1/sqrt(12) = "
                         f"{SIGMA_REL_MAX:.6f}] (1/sqrt(12) is the uniform mean, gamma = 0)")
    lo, hi = 0.0, max(0.0, 1.0 / sigma_rel - 2.0)
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            return lo if abs(gamma_to_sigma_rel(lo) - sigma_rel) <= \
                abs(gamma_to_sigma_rel(hi) - sigma_rel) else hi
        if gamma_to_sigma_rel(mid) > sigma_rel:
            lo = mid
        else:
            hi = mid


def phema_decay(t, t_prev, gamma):
    """Weight (t_prev / t)^(γ+1) of the old average when the power EMA moves from t_prev to t.
    Over acting times 0 = t_0 < t_1 < ... < t_n = t the decays telescope: θ at t_j keeps
    (t_j^(γ+1) − t_{j−1}^(γ+1)) / t^(γ+1) = ∫ over (t_{j−1}, t_j] of p(x) dx, the mass the
    continuous profile puts on the interval that iterate stands for. Every period φ:
    (1 − φ/t)^(γ+1), EDM2's update with t_delta = φ; t_prev = 0 gives 0 (the first update
    replaces the initial copy)."""
    return (t_prev / t) ** (gamma + 1)


@register
class PHEMA(Averager):
    """Power-function EMA (EDM2): at t = s − τ the average of the iterates it saw, the one at
    t' in (0, t] weighted ∝ t'^γ, i.e. e ← d·e + (1 − d)·θ_s with d = (1 − φ/t)^(γ+1)
    (phema_decay). Its length grows with t: the profile's std is the fixed fraction σ_rel of t.

    The width is one number given one of two ways: phema_sigma_rel (σ_rel, EDM2's relative
    standard deviation of the profile; γ from it by sigma_rel_to_gamma) or phema_gamma (γ
    itself). Exactly one of them is set, the other None, so a config never holds two widths
    that disagree. γ >= 0: γ = 0 is the uniform mean (swa), larger γ a shorter average.

    Conventions: initialised to a copy of θ_τ, which is the average until the first update; that
    update has d = 0, so θ_τ has weight 0 from then on (EDM2's average never contains the
    initialisation either). With acting times t_j (multiples of φ, or the snapshots offline) θ
    at t_j has the weight (t_j^(γ+1) − t_{j−1}^(γ+1)) / t^(γ+1): exactly the continuous profile's
    mass over the interval (t_{j−1}, t_j] it stands for, ≈ ∝ t_j^γ for t_j ≫ φ. With every
    φ steps these weights depend only on j = t_j/φ: φ rescales time, the profile keeps its
    shape. Offline (allow_gaps) the decay uses the real previous step, so a snapshot stands for
    the steps since the one before it.
    """
    name = "phema"
    defaults = {
        "phema_sigma_rel": 0.05,   # σ_rel: the profile's std / t (EDM2 stores 0.05 and 0.10)
        "phema_gamma": None,       # γ: weights ∝ t^γ (None: from phema_sigma_rel)
        "phema_update_after": 0,   # τ: burn-in step
        "phema_update_freq": 1,    # φ: acts every φ steps
    }
    optional_keys = {"phema_sigma_rel": float, "phema_gamma": float}
    start_key, freq_key, buffers = "phema_update_after", "phema_update_freq", ("e",)

    def _validate(self, hp):
        sigma_rel, gamma = hp["phema_sigma_rel"], hp["phema_gamma"]
        if sigma_rel is not None and gamma is not None:
            raise ValueError(
                f"phema_sigma_rel={sigma_rel!r} and phema_gamma={gamma!r} both set the profile "
                f"width (gamma = sigma_rel_to_gamma(sigma_rel)); set the one you do not use to "
                f"None, e.g. phema_sigma_rel=None with phema_gamma={gamma!r}")
        if sigma_rel is None and gamma is None:
            raise ValueError("phema_sigma_rel=None and phema_gamma=None: set one of them, e.g. "
                             "phema_sigma_rel=0.05 (or phema_gamma=16.97, the same width)")
        if gamma is None:
            self.sigma_rel = _real(hp, "phema_sigma_rel", 0.0, SIGMA_REL_MAX, lo_open=True,
                                   why=" (1/sqrt(12) is the uniform mean; for wider profiles "
                                       "use swa)")
            self.gamma = sigma_rel_to_gamma(self.sigma_rel)
        else:
            self.gamma = _real(hp, "phema_gamma", 0.0,
                               why=" (gamma < 0 would weight the earliest iterates most)")
            self.sigma_rel = gamma_to_sigma_rel(self.gamma)

    def _init(self, theta):
        self.e = _copy(theta)

    def _update(self, t, theta):
        # self.step is still the previous acting step here: t_prev = 0 at the first update
        ema_update_(self.e, theta, 1.0 - phema_decay(t, self.step - self.tau, self.gamma))

    def _update_gap(self, t_prev, t, theta):   # the decay spans the gap already (exact)
        self._update(t, theta)

    def average(self):
        return self.e


def parse_method_list(spec, key, allow_empty):
    """'ema, bema,lawa' (the config value of `key`) -> ['ema', 'bema', 'lawa'], each method
    known and listed once; 'all' is every registered method."""
    if spec.strip() == "all":
        return list(AVERAGERS)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        if name not in AVERAGERS:
            raise ValueError(f"{key}={spec!r}: {name!r} is not an averaging method; use 'all' "
                             f"or a comma-separated subset of {','.join(AVERAGERS)}"
                             f"{' (or nothing for none)' if allow_empty else ''}")
    if len(set(names)) != len(names):
        raise ValueError(f"{key}={spec!r} lists a method twice")
    if not names and not allow_empty:
        raise ValueError(f"{key}={spec!r}: name at least one method")
    return names


def build_averager(name, allow_gaps=False, fill_gaps=False, **hparams):
    """The averager registered under `name`, e.g. build_averager("bema", bema_lag=10.0)."""
    if name not in AVERAGERS:
        raise ValueError(f"averager {name!r} is unknown; use one of {', '.join(AVERAGERS)}")
    return AVERAGERS[name](allow_gaps=allow_gaps, fill_gaps=fill_gaps, **hparams)
