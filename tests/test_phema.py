"""The power-function EMA averager (averaging.py's `phema`, EDM2) against float64 references
written from the definition, never by calling averaging.py's phema code:
- the explicit weighted sum Σ_j w_j θ_j with the weights the recursion implies,
  w_j = (t_j^(γ+1) − t_{j−1}^(γ+1)) / t^(γ+1) over its acting times t_j = s_j − τ (derived in
  averaging.phema_decay; tests/test_posthoc.py checks the closed form against the recursion);
- γ from σ_rel by EDM2's own recipe (the largest real root of its cubic, numpy.roots);
- the Triton kernel (interpreted on CPU) against the torch code.
Shared conventions (None before τ, bitwise resume, bf16 θ, validation) run in
tests/test_averaging.py and tests/test_online_averaging.py with every registered method.

Tolerances: float32 state over <= 1000 lerps of O(1) values stays within a few 1e-6 of the
largest |value| (measured below 1e-6); a one-step time shift or the wrong exponent moves the
average by 1e-3 or more.
"""


# conftest.py sets TRITON_INTERPRET=1: the Triton tests run the kernels in its interpreter

import numpy as np
import pytest
import torch
from trajectories import random_walk, run_averager

from averaging import build_averager
from wagpt import kernels
from wagpt.configurator import load_config
from wagpt.errors import ConfigError
from wagpt.online_averaging import averager_hparams
from wagpt.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

T, P = 1001, 29


def trajectory(seed=0, T=T, P=P):
    return random_walk(seed, T, P)


TRAJ = trajectory()


def run(avg, traj=TRAJ, steps=None, dtype=torch.float32):
    return run_averager(avg, traj, steps, dtype)


def gamma_edm2(sigma_rel):
    """EDM2's recipe: the largest real root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²)."""
    q = sigma_rel ** -2
    return float(np.roots([1.0, 7.0, 16.0 - q, 12.0 - q]).real.max())


def power_ema_reference(traj, acting, gamma):
    """{s: Σ_j w_j θ_{s_j}} over the acting steps s_0 = τ < s_1 < ... <= s, with
    w_j = (t_j^(γ+1) − t_{j−1}^(γ+1)) / t^(γ+1), t_j = s_j − τ; θ_τ alone before s_1. (The
    numerators are summed as they come, then divided by t^(γ+1): float64 holds t^(γ+1) for
    the t and γ used here.)"""
    acting = sorted(acting)
    tau, ref, cur = acting[0], {}, None
    numerator, t_prev = torch.zeros_like(traj[0]), 0.0
    for s in range(len(traj)):
        if s == tau:
            cur = traj[tau].clone()
        elif s in acting:
            t = float(s - tau)
            numerator += (t ** (gamma + 1) - t_prev ** (gamma + 1)) * traj[s]
            cur, t_prev = numerator / t ** (gamma + 1), t
        ref[s] = None if cur is None else cur.clone()
    return ref


def worst_error(got, ref):
    """max over steps of max|got − ref| / max(1, max|ref|); None-ness must agree."""
    assert got.keys() == ref.keys()
    worst = 0.0
    for s in ref:
        assert (got[s] is None) == (ref[s] is None), f"step {s}"
        if ref[s] is not None:
            scale = max(1.0, ref[s].abs().max().item())
            worst = max(worst, (got[s] - ref[s]).abs().max().item() / scale)
    return worst


# --------------------------------------------------------------------- the averaged weights

@pytest.mark.parametrize("gamma,tau,phi", [(0.0, 0, 1), (1.0, 7, 1), (6.94, 0, 3),
                                           (16.97, 25, 4), (3.5, 11, 7)])
def test_phema_equals_the_explicit_power_weighted_sum(gamma, tau, phi):
    avg = build_averager("phema", phema_sigma_rel=None, phema_gamma=gamma,
                         phema_update_after=tau, phema_update_freq=phi)
    acting = [s for s in range(tau, T, phi)]
    assert worst_error(run(avg), power_ema_reference(TRAJ, acting, gamma)) < 2e-6


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.2])
def test_sigma_rel_key_gives_edm2s_exponent(sigma_rel):
    avg = build_averager("phema", phema_sigma_rel=sigma_rel, phema_update_after=3)
    assert avg.gamma == pytest.approx(gamma_edm2(sigma_rel), rel=1e-12)
    got = run(avg)
    assert worst_error(got, power_ema_reference(TRAJ, range(3, T), gamma_edm2(sigma_rel))) < 2e-6
    # the tolerance resolves the width: a 10% larger exponent is far outside it
    assert worst_error(got, power_ema_reference(TRAJ, range(3, T), 1.1 * avg.gamma)) > 1e-4


def test_the_first_update_replaces_theta_tau():
    """θ_τ is the average until the first update, then has weight 0 (EDM2: β = 0 at t = δ)."""
    tau, phi = 4, 3
    traj = TRAJ.clone()
    traj[tau] = 1e6   # any trace of θ_τ would show
    avg = build_averager("phema", phema_update_after=tau, phema_update_freq=phi)
    got = run(avg, traj=traj, steps=range(tau + 2 * phi + 1))
    assert torch.equal(got[tau], traj[tau].float().double())
    assert torch.equal(got[tau + phi], traj[tau + phi].float().double())   # bitwise θ_{τ+φ}
    assert got[tau + 2 * phi].abs().max() < 10


def test_time_scale_invariance():
    """With every φ steps the weights depend only on j = t_j/φ: φ = 5 over θ_{τ+5j} equals
    φ = 1 over the same iterates fed one per step."""
    tau, phi, n = 2, 5, 150
    every_fifth = build_averager("phema", phema_update_after=tau, phema_update_freq=phi)
    every_step = build_averager("phema", phema_update_after=0)
    a = run(every_fifth, steps=range(tau, tau + phi * n + 1))
    b = run(every_step, traj=TRAJ[tau::phi], steps=range(n + 1))
    assert torch.equal(a[tau + phi * n], b[n])   # the same decays, float for float


def test_gaps_weight_each_snapshot_by_the_interval_it_stands_for():
    """Offline (allow_gaps): at snapshots t_1 < t_2 < ... the decay uses the real previous step,
    so the weights are the profile's mass on (t_{j−1}, t_j]."""
    steps = [5, 6, 9, 10, 30, 31, 100, 400, 401, 1000]
    gamma = 2.5
    avg = build_averager("phema", allow_gaps=True, phema_sigma_rel=None, phema_gamma=gamma,
                         phema_update_after=5)
    got = run(avg, steps=steps)
    ref = power_ema_reference(TRAJ, steps, gamma)
    assert worst_error(got, {s: ref[s] for s in steps}) < 2e-6


def test_weights_approximate_the_power_function():
    """Fed θ_j = the j-th unit vector, the average IS the weight vector: ≈ ∝ j^γ, with the
    difference (a bin integral vs the value at its right end) of order γ/n; it is much closer
    to ∝ (j − ½)^γ (the midpoint rule)."""
    for gamma in (1.0, 6.94, 16.97):
        tv = {}
        for n in (100, 1000):
            avg = build_averager("phema", phema_sigma_rel=None, phema_gamma=gamma)
            eye = torch.eye(n + 1, dtype=torch.float64)
            run(avg, traj=eye, steps=range(n + 1))
            w = avg.average().double()
            j = torch.arange(n + 1, dtype=torch.float64)
            at_j = j ** gamma / (j ** gamma).sum()
            midpoint = (j - 0.5).clamp(min=0) ** gamma
            midpoint /= midpoint.sum()
            assert w[0] == 0 and abs(w.sum().item() - 1) < 1e-5
            tv[n] = 0.5 * (w - at_j).abs().sum().item()
            assert tv[n] < (gamma + 1) / n
            assert 0.5 * (w - midpoint).abs().sum().item() < tv[n] / 5
        assert tv[1000] < tv[100] / 8   # O(1/n)


# -------------------------------------------------------------------------------- kernels

def test_triton_kernel_equals_torch(monkeypatch):
    """The update goes through averaging.ema_update_, so the fused EMA kernel runs it under
    backend "triton" (interpreted here, compiled on CUDA); same numbers as torch."""
    ops = kernels.triton_ops()
    if not ops.INTERPRETED:
        pytest.fail("kernels were compiled for a GPU before TRITON_INTERPRET=1 was set")
    traj = trajectory(seed=3, T=30, P=ops.BLOCK + 5)
    results, calls = {}, []
    real = ops.ema_update_

    def counted(*args):
        calls.append(args[2])
        return real(*args)

    monkeypatch.setattr(ops, "ema_update_", counted)
    for backend in ("torch", "triton"):
        avg = build_averager("phema", phema_sigma_rel=0.1, phema_update_after=1,
                             phema_update_freq=2)
        with kernels.backend(backend):
            results[backend] = run(avg, traj=traj)[29]
    assert len(calls) == 14 and calls[0] == 1.0   # one kernel per update; the first copies θ
    assert torch.allclose(results["triton"], results["torch"], rtol=0, atol=1e-6)
    ref = power_ema_reference(traj, range(1, 30, 2), gamma_edm2(0.1))[29]
    assert (results["triton"] - ref).abs().max() < 1e-5


# ------------------------------------------------------------------------- keys and config

@pytest.mark.parametrize("hp,match", [
    (dict(phema_gamma=3.0), "phema_sigma_rel=0.05 and phema_gamma=3.0 both set"),
    (dict(phema_sigma_rel=None), "phema_sigma_rel=None and phema_gamma=None"),
    (dict(phema_sigma_rel=0.0), "phema_sigma_rel=0.0"),
    (dict(phema_sigma_rel=0.3), "phema_sigma_rel=0.3"),
    (dict(phema_sigma_rel=None, phema_gamma=-0.5), "phema_gamma=-0.5"),
    (dict(phema_sigma_rel=None, phema_gamma=float("inf")), "phema_gamma=inf"),
    (dict(phema_sigma_rel=None, phema_gamma=True), "phema_gamma=True"),
    (dict(phema_update_freq=0), "phema_update_freq"),
    (dict(phema_update_after=-1), "phema_update_after"),
])
def test_bad_settings_name_the_key(hp, match):
    with pytest.raises(ValueError, match=match):
        build_averager("phema", **hp)


def test_config_takes_either_width_key():
    cfg = load_config(TrainConfig, ["--averaging=phema", "--phema_sigma_rel=None",
                                    "--phema_gamma=7"])
    assert averager_hparams(cfg)["phema"] == dict(phema_sigma_rel=None, phema_gamma=7.0,
                                                  phema_update_after=0, phema_update_freq=1)
    cfg = load_config(TrainConfig, ["--averaging=phema", "--phema_sigma_rel=0.1"])
    assert averager_hparams(cfg)["phema"]["phema_sigma_rel"] == 0.1
    with pytest.raises(ConfigError, match="phema_sigma_rel=None with phema_gamma=7"):
        load_config(TrainConfig, ["--averaging=phema", "--phema_gamma=7"])
