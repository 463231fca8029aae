"""
Post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
EDM2, CVPR 2024): choose the length of a power-function EMA after training. Training tracks two
power-function EMAs (averaging.py's `phema`, EDM2's σ_rel 0.05 and 0.10) and stores them with
every snapshot; the power-function EMA of any other width at a stored step is then, very nearly,
a linear combination of the stored ones, with coefficients from a least-squares fit of their
weight profiles.

    stored = [(t_i, gamma_i), ...]     # each stored EMA: t = s - τ (steps since burn-in), its γ
    coeffs = solve_coefficients(stored, target=(t_r, sigma_rel_to_gamma(0.2)))
    weights = synthesize(coeffs, tensors)   # tensors: the stored flat EMAs, in the order of stored
    reconstruction_error(stored, (t_r, gamma_r), coeffs)   # relative L2 error of the profile

The math (docs/averaging.md, "Post-hoc reconstruction of any width", has it in full):
- Profile. The phema average with exponent γ at time t is ∫ p(x) θ̄(x) dx with
  p(x) = (γ+1) x^γ / t^(γ+1) on (0, t] and θ̄ the trajectory held piecewise constant: θ̄(x) is θ at
  the first acting step at or after x. This is exact for the recursion training runs (see
  averaging.phema_decay): the iterate at t_j = jφ carries the profile's mass over ((j−1)φ, jφ],
      w_j = (j^(γ+1) − (j−1)^(γ+1)) / n^(γ+1),   n = t/φ,   Σ_j w_j = 1.
- Fit. A combination Σ_i c_i e_i of stored averages has the profile Σ_i c_i p_i. EDM2 picks c
  minimising ‖Σ_i c_i p_i − p_r‖², i.e. A c = b with A_ik = ⟨p_i, p_k⟩, b_i = ⟨p_i, p_r⟩, then
  rescales c to sum to 1 so that the result is a weighted average like every EMA (the weights of
  every profile sum to 1; without the rescaling a poor fit also shrinks or grows the weights).
- Inner products, two variants:
  continuous (EDM2): ⟨p_a, p_b⟩ = ∫ p_a p_b dx = (γ_a+1)(γ_b+1)/(γ_a+γ_b+1) · (t_a/t_b)^γ_b / t_b
      for t_a <= t_b (the integral of x^(γ_a+γ_b) over (0, t_a]).
  exact (the default): Σ_j w_a,j w_b,j over the acting iterates, the discrete weights above. The
      reconstruction error in weights is Σ_j (Σ_i c_i w_i,j − w_r,j) θ_j, so this is the norm
      that matters; the continuous one also counts structure inside one period that no average
      can see. The two agree once the profiles near the target are many periods wide
      (σ_rel·t >~ 10φ) and differ when they are not; docs/averaging.md has the measured gap.
      Cost: a pass over the n = t/φ iterates per distinct γ (gram_matrix explains), well under a
      second for n = 10^6.
Only stored averages from at or before the target step may enter (as in EDM2): one from later
would mix in iterates the target average has not seen.

Where the stored ones come from and go: train.py keeps them (posthoc_sigma_rel) and writes them
with every snapshot (checkpoint.save_posthoc); average.py reconstructs from them with
Reconstruction below, which streams the files.
"""

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# the σ_rel ↔ γ relation is the phema averager's own; re-exported here for post-hoc users
from averaging import SIGMA_REL_MAX, gamma_to_sigma_rel, sigma_rel_to_gamma  # noqa: F401
from wagpt import checkpoint
from wagpt.errors import CheckpointError, ConfigError

_CHUNK = 1 << 16   # iterates per block of the exact inner products


# ------------------------------------------------------------------------------- profiles

def _bin_masses(j, n, gamma):
    """(j^(γ+1) − (j−1)^(γ+1)) / n^(γ+1) for 1 <= j <= n (arrays broadcast), 0 for j > n.
    Written (j/n)^(γ+1) · (1 − (1 − 1/j)^(γ+1)) so that large j does not subtract two nearly equal
    powers; at j = 1 the second factor is 1 (log1p(−1) = −inf, expm1(−inf) = −1)."""
    with np.errstate(divide="ignore"):
        mass = (j / n) ** (gamma + 1) * -np.expm1((gamma + 1) * np.log1p(-1.0 / j))
    return np.where(j <= n, mass, 0.0)


def profile_weights(t, gamma, update_freq=1):
    """float64 weights of the iterates at t' = φ, 2φ, ..., t (steps since burn-in) in the phema
    average at t with exponent γ and period φ = update_freq (the initial copy at t' = 0 has
    weight 0). They sum to 1 and depend only on n = t/φ."""
    n = _updates(t, update_freq, "t")
    return _bin_masses(np.arange(1, n + 1, dtype=np.float64), n, float(gamma))


def profile_inner_product(t_a, gamma_a, t_b, gamma_b):
    """∫ p_a(x) p_b(x) dx of the continuous profiles p(x) = (γ+1) x^γ / t^(γ+1) on (0, t]."""
    if t_a > t_b:
        t_a, gamma_a, t_b, gamma_b = t_b, gamma_b, t_a, gamma_a
    return ((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
            * (t_a / t_b) ** gamma_b / t_b)


def gram_matrix(profiles, exact=True, update_freq=1):
    """(K, K) float64 matrix of the inner products of the profiles [(t, γ), ...]: exact = sums
    over the discrete weights of the acting iterates (t in steps, multiples of update_freq);
    exact=False = EDM2's continuous integrals."""
    gamma = np.array([p[1] for p in profiles], dtype=np.float64)
    if not exact:
        t = [p[0] for p in profiles]
        return np.array([[profile_inner_product(ta, ga, tb, gb) for tb, gb in zip(t, gamma)]
                         for ta, ga in zip(t, gamma)])
    n = np.array([_updates(p[0], update_freq, "t") for p in profiles], dtype=np.int64)
    # A profile ending at n weighs iterate j by (j/n)^(γ+1)·(1 − (1 − 1/j)^(γ+1)): on a stretch
    # of iterates (m', m] every profile with this γ still running at m (n >= m) is the one
    # ending at m scaled by (m/n)^(γ+1). So cut 1..max(n) at the distinct ends m, sum the
    # products of the few distinct-γ base profiles over each stretch, and scale: work
    # (number of distinct γ)² · max(n), not K² · max(n), and no scale factor above 1.
    gammas, which = np.unique(gamma, return_inverse=True)
    gram = np.zeros((len(profiles), len(profiles)))
    previous_end = 0
    for end in np.unique(n):
        products = np.zeros((len(gammas), len(gammas)))
        for first in range(previous_end + 1, end + 1, _CHUNK):
            j = np.arange(first, min(first + _CHUNK, end + 1), dtype=np.float64)
            base = _bin_masses(j[None, :], float(end), gammas[:, None])
            # weights below 1e-100 change nothing, and products of such subnormal-range numbers
            # slow BLAS down a hundredfold
            base[base < 1e-100] = 0.0
            products += base @ base.T
        live = np.flatnonzero(n >= end)
        scale = (end / n[live]) ** (gamma[live] + 1)
        gram[np.ix_(live, live)] += (np.outer(scale, scale)
                                     * products[np.ix_(which[live], which[live])])
        previous_end = end
    return gram


# ------------------------------------------------------------------------ reconstruction

def solve_coefficients(stored, target, exact=True, update_freq=1):
    """Coefficients c (float64, one per stored average, summing to 1) with Σ_i c_i e_i the best
    approximation of the phema average `target` = (t_r, γ_r) from the stored ones
    `stored` = [(t_i, γ_i), ...] (t in steps since burn-in, each t_i <= t_r; with exact=True
    all multiples of update_freq, the stored averagers' period). EDM2's least squares with its
    rescaling to sum 1; exact=False uses its continuous inner products."""
    return fit(stored, target, exact, update_freq)[0]


def fit(stored, target, exact=True, update_freq=1):
    """(solve_coefficients(...), reconstruction_error(...) of them) from one Gram matrix."""
    gram = _checked_gram(stored, target, exact, update_freq)
    coeffs = _solve(gram, stored, target)
    return coeffs, _error(gram, coeffs)


def _solve(gram, stored, target):
    coeffs = np.linalg.lstsq(gram[:-1, :-1], gram[:-1, -1], rcond=None)[0]
    total = coeffs.sum()
    if not total > 1e-12:   # cannot happen for profiles of an actual run; guard the division
        raise ValueError(f"the least-squares coefficients for target {tuple(target)} sum to "
                         f"{total:.3g}: the stored profiles {list(stored)} cannot express it")
    return coeffs / total


def reconstruction_error(stored, target, coeffs, exact=True, update_freq=1):
    """‖Σ_i c_i p_i − p_r‖ / ‖p_r‖: the relative L2 error of the reconstructed weight profile
    (exact: over the discrete weights of the iterates, else of the continuous profiles).
    Computed from the inner products, so it bottoms out near 1e-8 (the square root of float64's
    resolution); a reconstruction from profiles spanning the target can be exact."""
    gram = _checked_gram(stored, target, exact, update_freq)
    c = np.asarray(coeffs, dtype=np.float64)
    if c.shape != (len(stored),):
        raise ValueError(f"coeffs has shape {c.shape}; expected ({len(stored)},), one per "
                         f"stored average")
    return _error(gram, c)


def _error(gram, c):
    target_norm2 = gram[-1, -1]
    err2 = c @ gram[:-1, :-1] @ c - 2 * c @ gram[:-1, -1] + target_norm2
    return math.sqrt(max(err2, 0.0) / target_norm2)


def synthesize(coeffs, tensors):
    """Σ_i c_i·tensors[i]: the reconstructed flat weights, float32. `tensors` is any iterable of
    the stored flat EMAs in the order of `coeffs` (a generator reading them one at a time keeps
    only one in memory); the sum is accumulated in float64, since coefficients of both signs
    cancel. coeffs of shape (K, R), R targets, give an (R, numel) tensor from one pass."""
    c = torch.as_tensor(np.asarray(coeffs, dtype=np.float64))
    if c.dim() not in (1, 2) or c.shape[0] == 0:
        raise ValueError(f"coeffs has shape {tuple(c.shape)}; expected (K,) or (K, R)")
    total, count = None, 0
    for x in tensors:
        if count == c.shape[0]:
            raise ValueError(f"more tensors than the {c.shape[0]} coefficients")
        if x.dim() != 1:
            raise ValueError(f"tensor {count} has shape {tuple(x.shape)}; expected a flat one")
        if total is None:
            total = torch.zeros(c.shape[1:] + x.shape, dtype=torch.float64, device=x.device)
        elif x.shape[-1] != total.shape[-1]:
            raise ValueError(f"tensor {count} has {x.numel()} entries, tensor 0 "
                             f"{total.shape[-1]}")
        _add_(total, c[count], x)
        count += 1
    if count != c.shape[0]:
        raise ValueError(f"{count} tensors for {c.shape[0]} coefficients")
    return total.to(torch.float32)


def _add_(total, coeff, x):
    """total += coeff·x in float64: total (numel,) with a scalar coeff, or (R, numel) with an
    (R,) coeff (one row per target). The one accumulation of synthesize and Reconstruction."""
    x = x.to(total.device, torch.float64)
    coeff = coeff.to(total.device)
    total += coeff[..., None] * x if coeff.dim() == 1 else coeff * x


class Reconstruction:
    """Post-hoc phemas of several target widths at several steps, from stored profiles read one
    file at a time: the reconstruction average.py evaluates (`--methods=phema` over a run's
    posthoc/ files).

        files = [(key, step, [(name, t, gamma), ...]), ...]   # stored files, in step order
        rec = Reconstruction(files, {"phema[...]": gamma_r, ...}, eval_steps, tau, update_freq,
                             read=lambda key: {name: flat tensor}, device="cpu", window=4)
        rec.coeffs[step], rec.errors[step]      # per target: coefficients, profile error
        weights = rec.at(step)                   # {label: float32 flat weights}, steps in order

    At an evaluation step s the target is the phema at t_r = s − τ (rounded down to a multiple
    of φ: the average as of its last update) and the stored profiles are those of the files at
    steps <= s (solve_coefficients with the exact inner products). Each file is read once per
    window: the reconstruction keeps a float64 accumulator per target for each of the next
    `window` evaluation steps (8 bytes x targets x window per parameter) and adds every file it
    reads into each of them; when the window's steps are done the next window reads the files
    from the first again. A file's contributions are added in file order, in float64, so the
    result equals synthesize(coeffs[step], the stored tensors) bit for bit, whatever the window.
    """

    def __init__(self, files, targets, steps, tau, update_freq, read, device="cpu", window=None):
        self.files, self.targets, self.read = list(files), dict(targets), read
        self.tau, self.phi, self.device = tau, update_freq, torch.device(device)
        self.coeffs, self.errors, self.stored = {}, {}, {}
        for step in sorted(steps):
            t_r = (step - tau) // update_freq * update_freq
            stored = [(i, name, t, gamma) for i, (_, file_step, profiles) in enumerate(self.files)
                      if file_step <= step for name, t, gamma in profiles if t > 0]
            if t_r <= 0 or not stored:
                continue   # before the first update there is no phema to reconstruct
            if max(t for _, _, t, _ in stored) < t_r:
                continue   # no profile reaches t_r: never a stale average (coverage())
            fits = [fit([(t, g) for _, _, t, g in stored], (t_r, gamma), update_freq=update_freq)
                    for gamma in self.targets.values()]
            self.stored[step] = {(i, name): k for k, (i, name, _, _) in enumerate(stored)}
            self.coeffs[step] = np.stack([c for c, _ in fits], axis=1)   # (K, R)
            self.errors[step] = {label: e for label, (_, e) in zip(self.targets, fits)}
        self.steps = sorted(self.coeffs)
        self.window = len(self.steps) if window is None else max(1, int(window))
        self.open, self.next_file = {}, 0

    def at(self, step):
        """{label: float32 flat weights} of every target at this evaluation step; call it with
        the evaluation steps in increasing order (a step may be left out)."""
        if step not in self.coeffs:
            return {}
        if step not in self.open:   # a new window: from this step on, files from the first
            first = self.steps.index(step)
            self.open = {s: None for s in self.steps[first:first + self.window]}
            self.next_file = 0
        while self.next_file < len(self.files) and self.files[self.next_file][1] <= step:
            i = self.next_file
            tensors = self.read(self.files[i][0])
            for s in self.open:
                columns = self.stored[s]
                for name, _, _ in self.files[i][2]:
                    if (i, name) not in columns:
                        continue
                    x = tensors[name]
                    if self.open[s] is None:
                        self.open[s] = torch.zeros(len(self.targets), x.numel(),
                                                   dtype=torch.float64, device=self.device)
                    coeff = torch.as_tensor(self.coeffs[s][columns[(i, name)]])
                    _add_(self.open[s], coeff, x)
            del tensors
            self.next_file += 1
        total = self.open.pop(step)
        return {label: total[r].to(torch.float32) for r, label in enumerate(self.targets)}


def coverage(files, steps, tau, update_freq):
    """(covered, uncovered): the steps of `steps` at which a phema exists (t_r = s − τ rounded
    down to a multiple of φ is > 0), split by whether a stored profile reaches t_r (one was
    last updated there: the file written with the snapshot of step s, or of a step after the
    last update before s). `files` as Reconstruction's. An uncovered step could only be
    reconstructed from older profiles, i.e. a stale average, so Reconstruction skips it."""
    covered, uncovered = [], []
    for step in sorted(steps):
        t_r = (step - tau) // update_freq * update_freq
        reached = [t for _, file_step, profiles in files if file_step <= step
                   for _, t, _ in profiles]
        if t_r <= 0:
            continue
        (covered if reached and max(reached) >= t_r else uncovered).append(step)
    return covered, uncovered


# ------------------------------------------------------------------- a run's stored profiles

@dataclass
class StoredProfiles:
    """The post-hoc profile files of a run that a reconstruction uses."""
    directory: Path | None
    looked_in: list             # the directories searched
    files: list                 # [(path, step, [(name, t, gamma), ...])] in step order: the
                                # selected profiles of each file, t = last update − τ
    tau: int | None = None      # the profiles' burn-in ...
    phi: int | None = None      # ... and period
    widths: list = field(default_factory=list)   # σ_rel of the selected profiles
    runs: dict = field(default_factory=dict)     # path -> the run that wrote it (or None)


def _raise(path, step, reason):
    raise CheckpointError(reason)


def find_stored_profiles(directories, model_args, widths=None, skip=_raise):
    """The StoredProfiles in the first of `directories` that holds posthoc files (train.py
    writes them to out_dir/posthoc/), read by their headers only; `widths` selects the stored
    σ_rel to use (None: all). A bad file goes to skip(path, step, reason) (by default an error
    naming it); profiles of another model than `model_args`, a width no file holds, and
    profiles of different burn-ins or periods are errors."""
    looked = [Path(d) for d in directories]
    directory = next((d for d in looked if checkpoint.list_snapshots(d)), None)
    stored = StoredProfiles(directory, looked, [])
    if directory is None:
        return stored
    records = []
    for path in checkpoint.list_snapshots(directory):
        try:
            record = checkpoint.read_posthoc(path, tensors=False)
            if {**record.model_args, "dropout": 0.0} != {**model_args, "dropout": 0.0}:
                raise CheckpointError(f"{path} holds profiles of another model: model_args "
                                      f"{record.model_args} differ from the trajectory's "
                                      f"{model_args}")
            records.append(record)
        except CheckpointError as e:
            skip(path, None, str(e))
    if not records:
        return stored
    available = {info["sigma_rel"] for r in records for info in r.profiles}
    wanted = available if widths is None else set(widths)
    missing = sorted(wanted - available)
    if missing:
        raise ConfigError(f"posthoc_profiles={list(widths)}: no profile of width {missing[0]} "
                          f"is stored in {directory} (there are "
                          f"{', '.join(f'{w:g}' for w in sorted(available))})")
    chosen = [(r, [info for info in r.profiles if info["sigma_rel"] in wanted])
              for r in records]
    timing = {(info["update_after"], info["update_freq"]) for _, infos in chosen for info in infos}
    if len(timing) > 1:
        raise ConfigError(f"the post-hoc profiles in {directory} have different burn-ins or "
                          f"periods (update_after, update_freq) {sorted(timing)}; one "
                          f"reconstruction needs one: select some with --posthoc_profiles")
    (stored.tau, stored.phi), = timing
    stored.widths = sorted(wanted)
    stored.runs = {r.path: r.run for r in records}
    stored.files = [(r.path, r.step, [(info["name"], info["last_update"] - stored.tau,
                                       info["gamma"]) for info in infos])
                    for r, infos in sorted(chosen, key=lambda c: c[0].step)]
    return stored


# ------------------------------------------------------------------------------- checks

def _updates(t, update_freq, what):
    """n = t/φ for a t in steps that must be a positive multiple of φ (an acting time)."""
    if isinstance(update_freq, bool) or not isinstance(update_freq, int) or update_freq < 1:
        raise ValueError(f"update_freq={update_freq!r}: must be an integer >= 1")
    n = t / update_freq
    if not (n >= 1 and float(n).is_integer()):
        raise ValueError(f"{what}={t!r}: must be a positive multiple of update_freq="
                         f"{update_freq} (the steps since burn-in at which the phema averagers "
                         f"act)")
    return int(n)


def _is_real(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _checked_gram(stored, target, exact, update_freq):
    stored = [tuple(p) for p in stored]
    if not stored:
        raise ValueError("stored is empty: give at least one (t, gamma) of a stored average")
    for what, (t, gamma) in [(f"stored[{i}]", p) for i, p in enumerate(stored)] + \
                            [("target", tuple(target))]:
        if not (_is_real(t) and math.isfinite(t) and t > 0):
            raise ValueError(f"{what}: t={t!r} must be a positive number of steps since "
                             f"burn-in (at t = 0 an average is still the initial copy)")
        if not (_is_real(gamma) and math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"{what}: gamma={gamma!r} must be a finite number >= 0")
    t_r = target[0]
    late = [p for p in stored if p[0] > t_r]
    if late:
        raise ValueError(f"stored average {late[0]} is from after the target t={t_r}: it mixes "
                         f"in iterates the target has not seen; pass only the stored averages "
                         f"with t <= {t_r}")
    return gram_matrix(stored + [tuple(target)], exact, update_freq)
