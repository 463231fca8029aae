"""Parity with the published tools: one test per row of docs/averaging.md's mapping table.

Each test re-derives a published tool's rule in float64 from its definition (written here, not
copied: the tools are named in the docstrings, read for their formulas and their step
conventions), runs it on random trajectories, and compares it with our implementation under the
mapping the table documents. Our state is float32, so "equal" means equal to float32 rounding:
a relative error of a few 1e-6 over a few hundred updates. Every mapping error these tests guard
against (a one-step shift, a wrong time base, a missing copy) is 1e-4 or larger; where no setting
of ours reproduces a tool, the test pins the size of the documented difference instead.

Time: θ_s is the weight vector after s optimizer updates (θ_0 = init). A tool whose hook runs after
the optimizer step with a call counter c (timm with step=n, LAWA's and epfml's classes,
ema-pytorch's KarrasEMA) sees θ_{c+1} at call c.
"""

import math

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn
from trajectories import random_walk, run_averager

from averaging import build_averager
from model import GPT, GPTConfig
from wagpt.embedding_metrics import (embedding_metrics, isotropy, isotropy_solver_sign,
                                     norm_logprob_correlation_all_rows)
from wagpt.posthoc import sigma_rel_to_gamma, solve_coefficients, synthesize
from wagpt.schedules import LRSchedule

T, P = 301, 64    # a few hundred updates of a 64-entry flat vector
TOL = 3e-6        # float32 rounding over T updates, relative to max(1, |value|)


def trajectory(seed=0):
    """θ_0..θ_{T-1}: a random walk with drift (float64), so averages lag and corrections matter."""
    return random_walk(seed, T, P, drift=3e-3, step=0.03, first_step=False)


TRAJ = trajectory()


def ours(name, steps=range(T), allow_gaps=False, traj=TRAJ, **hparams):
    """Our averager fed θ_s (float32, one tensor mutated in place) at `steps`: {s: average}."""
    avg = build_averager(name, allow_gaps=allow_gaps, **hparams)
    theta, out = torch.empty(P), {}
    for s in steps:
        theta.copy_(traj[s])
        avg.update(s, theta)
        a = avg.average()
        out[s] = None if a is None else a.double().clone()
    return out


def relative_error(got, ref):
    return ((got - ref).abs().max() / max(1.0, ref.abs().max().item())).item()


def assert_equal_at(got, ref, steps, tol=TOL):
    """Ours equals the reference at every step in `steps`; returns the worst relative error."""
    assert steps, "no step to compare"
    worst = 0.0
    for s in steps:
        assert got[s] is not None, f"step {s}: we have no average"
        err = relative_error(got[s], ref[s])
        assert err <= tol, f"step {s}: relative error {err:.3g} > {tol}"
        worst = max(worst, err)
    return worst


def worst_error(got, ref, steps):
    return max(relative_error(got[s], ref[s]) for s in steps)


# ============================================================================ BEMA, DEMA, OUEMA
# TRL's BEMACallback (trl/trainer/callbacks.py). on_train_begin: θ₀ = e = θ_0. on_step_end at
# global step s (updates applied): nothing before update_after τ; at s = τ (> 0) θ₀ = e = θ_s;
# at s > τ with (s − τ) % φ = 0, b = ρ + γ·s with the ABSOLUTE step s, β = max(b^−κ, β_min),
# α = b^−η, e ← (1 − β)e + βθ, output e + α(θ − θ₀).

def trl_bema(traj, update_freq, ema_power, bias_power, lag, update_after, multiplier,
             min_ema_multiplier):
    theta0, ema, out = traj[0].clone(), traj[0].clone(), {}
    for s in range(1, len(traj)):
        if s < update_after:
            continue
        if s == update_after:
            theta0, ema = traj[s].clone(), traj[s].clone()
        elif (s - update_after) % update_freq == 0:
            b = lag + multiplier * s
            beta = max(b ** -ema_power, min_ema_multiplier)
            alpha = b ** -bias_power
            ema = (1 - beta) * ema + beta * traj[s]
            out[s] = ema + alpha * (traj[s] - theta0)
    return out


@pytest.mark.parametrize("kappa,eta,rho,gamma,beta_min,phi", [
    (0.5, 0.2, 10.0, 1.0, 0.0, 1),      # the paper's defaults, every step
    (0.5, 0.2, 10.0, 1.0, 1e-4, 7),     # the HF configs' β_min, a period
    (0.3, 0.0, 3.0, 0.5, 0.0, 3),       # η = 0: full correction in both, as its docstring says
    (0.0, 0.4, 2.0, 2.0, 0.0, 1),       # κ = 0: β = 1, e = θ_s in both
])
def test_trl_bema_callback_tau_0(kappa, eta, rho, gamma, beta_min, phi):
    ref = trl_bema(TRAJ, phi, kappa, eta, rho, 0, gamma, beta_min)
    got = ours("bema", bema_ema_power=kappa, bema_bias_power=eta, bema_lag=rho,
               bema_multiplier=gamma, bema_min_ema_multiplier=beta_min, bema_update_freq=phi)
    assert_equal_at(got, ref, sorted(ref))


@pytest.mark.parametrize("tau,rho,gamma,phi", [(40, 10.0, 1.0, 1), (25, 2.0, 0.5, 4)])
def test_trl_bema_callback_tau_positive(tau, rho, gamma, phi):
    """TRL keeps the absolute step in b = ρ + γ·s; ours counts t = s − τ: lag = ρ + γτ."""
    ref = trl_bema(TRAJ, phi, 0.5, 0.2, rho, tau, gamma, 0.0)
    got = ours("bema", bema_lag=rho + gamma * tau, bema_multiplier=gamma, bema_update_after=tau,
               bema_update_freq=phi)
    assert_equal_at(got, ref, sorted(ref))
    # our own lag ρ instead would be a different schedule
    plain = ours("bema", bema_lag=rho, bema_multiplier=gamma, bema_update_after=tau,
                 bema_update_freq=phi)
    assert worst_error(plain, ref, sorted(ref)) > 1e-3


# The BEMA authors' offline tool (abblock/bema, src/core_offline.py), driven as its run_eval.py
# drives it: built from the initial model θ_0 (θ₀ and every EMA start there when update_after τ
# is 0), then update(θ_s, s) for each saved checkpoint s in order. time = max(s − τ + ρ_ref, 1);
# EMA weight β = max((1 + γ·time)^−κ, β_min), used only for 0 < κ < 1 (else the EMA is θ_s);
# BEMA's α = (1 + time)^−η without γ, used for η >= 0 (else the output is the EMA); OUEMA pulls
# θ back to θ̃ = θ/(1 − a) − θ₀·a/(1 − a), a = (1 + time)^−η, for η >= 0; DEMA outputs 2e₁ − e₂.

CHECKPOINTS = sorted({0, 1, 2, *range(5, T, 7), T - 1})   # the steps the offline tool is given


def offline_time(s, rho_ref):
    return max(s + rho_ref, 1)


def offline_beta(time, kappa, gamma, beta_min):
    return max((1 + gamma * time) ** -kappa, beta_min)


def offline_bema(traj, steps, kappa, eta, rho_ref, gamma=1.0, beta_min=0.0):
    theta0, ema, out = traj[0].clone(), traj[0].clone(), {}
    for s in steps:
        time = offline_time(s, rho_ref)
        if 0 < kappa < 1:
            beta = offline_beta(time, kappa, gamma, beta_min)
            ema = (1 - beta) * ema + beta * traj[s]
        else:
            ema = traj[s].clone()
        out[s] = ema + (1 + time) ** -eta * (traj[s] - theta0) if eta >= 0 else ema.clone()
    return out


def offline_dema(traj, steps, kappa, rho_ref, gamma=1.0, beta_min=0.0):
    e1, e2, out = traj[0].clone(), traj[0].clone(), {}
    for s in steps:
        beta = offline_beta(offline_time(s, rho_ref), kappa, gamma, beta_min)
        e1 = (1 - beta) * e1 + beta * traj[s]
        e2 = (1 - beta) * e2 + beta * e1
        out[s] = 2 * e1 - e2
    return out


def offline_ouema(traj, steps, kappa, eta, rho_ref, gamma=1.0, beta_min=0.0):
    theta0, ema, out = traj[0].clone(), traj[0].clone(), {}
    for s in steps:
        time = offline_time(s, rho_ref)
        mult_theta = 1 / (1 - (1 + time) ** -eta)
        mult_theta0 = 1 / ((1 + time) ** eta - 1)
        tilde = mult_theta * traj[s] - mult_theta0 * theta0
        if 0 < kappa < 1:
            beta = offline_beta(time, kappa, gamma, beta_min)
            ema = (1 - beta) * ema + beta * tilde
        else:
            ema = tilde
        out[s] = ema.clone()
    return out


def tool_switches(kappa, eta=None):
    """The tool's off switches in our keys: κ outside (0, 1) is no EMA (our κ < 0); η < 0 no
    correction (our η < 0)."""
    ema_power = kappa if 0 < kappa < 1 else -1.0
    return ema_power if eta is None else (ema_power, eta if eta >= 0 else -1.0)


@pytest.mark.parametrize("kappa,eta,rho_ref,beta_min", [
    (0.5, 0.2, 10, 1e-4),     # the authors' hydra config (update_freq 400 = which checkpoints)
    (0.5, 0.2, 0, 0.0),
    (0.7, 0.0, 3, 0.0),       # η = 0: full correction in both
    (0.5, -1.0, 10, 0.0),     # η < 0: the paper's "EMA" baseline
    (1.5, 0.2, 10, 0.0),      # κ >= 1: the tool drops the EMA; ours with κ < 0
])
def test_bema_authors_offline_tool(kappa, eta, rho_ref, beta_min):
    ref = offline_bema(TRAJ, CHECKPOINTS, kappa, eta, rho_ref, beta_min=beta_min)
    ema_power, bias_power = tool_switches(kappa, eta)
    # average.py's period: every snapshot given (the tool's update_freq chose the checkpoints)
    got = ours("bema", steps=CHECKPOINTS, allow_gaps=True, bema_update_freq=1,
               bema_lag=rho_ref + 1.0, bema_ema_power=ema_power, bema_bias_power=bias_power,
               bema_min_ema_multiplier=beta_min)
    assert_equal_at(got, ref, CHECKPOINTS)


def test_bema_authors_offline_tool_with_gamma_not_1_has_no_mapping():
    """γ ≠ 1: the tool's β has base 1 + γ(t + ρ_ref), its α base 1 + t + ρ_ref; our one base
    b_t = lag + multiplier·t matches either, never both. Pinned on this toy run (γ = 0.5,
    ρ_ref = 10, the worst step relative to max|θ|): 3e-2 with β exact (lag 1 + γρ_ref,
    multiplier γ), 5e-2 with α exact (lag ρ_ref + 1, multiplier 1), and no better than 7e-3 for
    any lag and multiplier tried (the best: lag 10, multiplier 0.625)."""
    gamma, rho_ref = 0.5, 10
    ref = offline_bema(TRAJ, CHECKPOINTS, 0.5, 0.2, rho_ref, gamma=gamma)
    later = CHECKPOINTS[1:]

    def error(lag, multiplier):
        got = ours("bema", steps=CHECKPOINTS, allow_gaps=True, bema_update_freq=1,
                   bema_lag=lag, bema_multiplier=multiplier)
        return worst_error(got, ref, later)

    assert 2e-2 < error(1 + gamma * rho_ref, gamma) < 5e-2      # β exact
    assert 3e-2 < error(rho_ref + 1.0, 1.0) < 7e-2              # α exact
    grid = [error(lag, m) for lag in (4.0, 6.0, 8.0, 10.0, 11.0, 12.0, 14.0)
            for m in (0.5, 0.625, 0.75, 1.0)]
    assert 5e-3 < min(grid) < 1e-2


@pytest.mark.parametrize("rho_ref,beta_min", [(10, 1e-4), (2, 0.0)])
def test_dema_authors_offline_tool(rho_ref, beta_min):
    ref = offline_dema(TRAJ, CHECKPOINTS, 0.5, rho_ref, beta_min=beta_min)
    got = ours("dema", steps=CHECKPOINTS, allow_gaps=True, dema_lag=rho_ref + 1.0,
               dema_min_ema_multiplier=beta_min)
    assert_equal_at(got, ref, CHECKPOINTS)


@pytest.mark.parametrize("kappa,eta,rho_ref,beta_min", [
    (0.5, 0.2, 1, 1e-4),      # the authors' hydra config: ρ_ref = 1 is our default lag 2
    (0.5, 0.5, 4, 0.0),
    (1.5, 0.2, 1, 0.0),       # κ >= 1: no EMA, the output is θ̃_s
])
def test_ouema_authors_offline_tool(kappa, eta, rho_ref, beta_min):
    ref = offline_ouema(TRAJ, CHECKPOINTS, kappa, eta, rho_ref, beta_min=beta_min)
    lag = {} if rho_ref == 1 else {"ouema_lag": rho_ref + 1.0}   # rho_ref 1: our default
    got = ours("ouema", steps=CHECKPOINTS, allow_gaps=True, ouema_bias_power=eta,
               ouema_ema_power=tool_switches(kappa), ouema_min_ema_multiplier=beta_min, **lag)
    assert_equal_at(got, ref, CHECKPOINTS)


# The authors' HF callback (abblock/bema, src/core_online.py, latest): θ₀ = e = θ at train begin
# (θ_0; update_after only delays the updates). At global step s >= τ_ref, not yet used, with
# (s − last) % φ = 0 (last starts at −1, so it acts at s ≡ φ − 1 mod φ): te = max(0, s − ρ_ref),
# β = γ_ref·(1 + te)^−κ (floored at β_min when β_min > 0), α = γ_ref·(1 + te)^−η; κ <= 0 means
# e = θ_s, η <= 0 means output = e.

def authors_hf_callback(traj, update_freq, ema_power, eta_power, update_after, scaling_lag,
                        ema_gamma, min_ema_multiplier):
    theta0, ema, out, last = traj[0].clone(), traj[0].clone(), {}, -1
    for s in range(1, len(traj)):
        if s < update_after or s == last or (s - last) % update_freq:
            continue
        te = max(0, s - scaling_lag)
        if ema_power > 0:
            beta = ema_gamma * (1 + te) ** -ema_power
            if min_ema_multiplier > 0:
                beta = max(beta, min_ema_multiplier)
            ema = ema * (1 - beta) + beta * traj[s]
        else:
            ema = traj[s].clone()
        alpha = ema_gamma * (1 + te) ** -eta_power if eta_power > 0 else 0.0
        out[s] = ema + alpha * (traj[s] - theta0)
        last = s
    return out


@pytest.mark.parametrize("phi,rho_ref,tau_ref,kappa,eta", [
    (1, 0, 0, 0.5, 0.2),
    (5, 1, 0, 0.5, 0.2),      # acts at 4, 9, 14, ...
    (3, 0, 20, 0.5, 0.0),     # η = 0 is off there: our η < 0
    (1, 1, 7, 0.0, 0.4),      # κ = 0 is off there: our κ < 0
])
def test_bema_authors_hf_callback(phi, rho_ref, tau_ref, kappa, eta):
    """Maps for γ_ref = 1 and ρ_ref <= 1 (lag = 1 − ρ_ref), fed its acting steps: our averager
    from θ_0 (τ = 0) with allow_gaps, as average.py runs over snapshots taken at those steps."""
    ref = authors_hf_callback(TRAJ, phi, kappa, eta, tau_ref, rho_ref, 1.0, 0.0)
    steps = [0] + sorted(ref)
    got = ours("bema", steps=steps, allow_gaps=True, bema_update_freq=1,
               bema_lag=1.0 - rho_ref, bema_ema_power=kappa if kappa > 0 else -1.0,
               bema_bias_power=eta if eta > 0 else -1.0)
    assert_equal_at(got, ref, sorted(ref))


def test_bema_authors_hf_callback_default_lag_has_no_mapping():
    """ρ_ref = 10 (its default): β = α = 1 for the first 10 steps, then (1 + s − 10)^−κ, with θ₀
    still θ_0; no line b_t = lag + multiplier·t of ours, with any burn-in, has that flat start.
    Pinned on this toy run: every lag, multiplier and burn-in tried stays 4e-2 or more of max|θ|
    away (the same schedule from step 10 anchored at θ_10 instead of θ_0: 1e-1)."""
    ref = authors_hf_callback(TRAJ, 1, 0.5, 0.2, 0, 10, 1.0, 0.0)
    errors = [worst_error(ours("bema", bema_update_after=tau, bema_update_freq=1,
                               bema_lag=lag, bema_multiplier=m), ref, range(11, T))
              for tau in (0, 10) for lag in (0.0, 1.0, 2.0, 4.0, 8.0, 10.0) for m in (0.5, 1.0)
              if lag + m >= 1]
    assert 4e-2 < min(errors) < 1e-1


# ===================================================================================== EMA
# timm's ModelEmaV3 (timm/utils/model_ema.py): a copy of the model θ_0, then update(model, step=n)
# after each optimizer step n = 1, 2, ...: k = max(0, n − update_after_step − 1); decay 0 (a copy
# of θ_n) while k <= 0, else min(d, 1 − (1 + k/γ)^−p) (floored at min_decay) with warmup, d
# without; e ← lerp(e, θ_n, 1 − decay). Called with step=None the decay is d from the first call.

def timm_model_ema_v3(traj, decay, update_after_step, use_warmup, warmup_gamma=1.0,
                      warmup_power=2 / 3, min_decay=0.0, pass_step=True):
    ema, out = traj[0].clone(), {}
    for n in range(1, len(traj)):
        if not pass_step:
            d = decay
        else:
            k = max(0, n - update_after_step - 1)
            if k <= 0:
                d = 0.0
            elif use_warmup:
                d = max(min(1 - (1 + k / warmup_gamma) ** -warmup_power, decay), min_decay)
            else:
                d = decay
        ema = ema + (1 - d) * (traj[n] - ema)
        out[n] = ema.clone()
    return out


@pytest.mark.parametrize("update_after_step,use_warmup", [(0, True), (0, False), (7, True),
                                                           (7, False)])
def test_timm_model_ema_v3(update_after_step, use_warmup):
    """timm's update_after_step U is our ema_update_after U + 1; U = 0 is our default."""
    ref = timm_model_ema_v3(TRAJ, 0.99, update_after_step, use_warmup, warmup_gamma=2.0)
    start = {} if update_after_step == 0 else {"ema_update_after": update_after_step + 1}
    got = ours("ema", ema_decay=0.99, ema_warmup=use_warmup, ema_warmup_gamma=2.0, **start)
    assert_equal_at(got, ref, range(update_after_step + 1, T))
    if use_warmup:   # the old phase (from θ_0) was one step ahead of timm's
        early = ours("ema", ema_decay=0.99, ema_warmup=True, ema_warmup_gamma=2.0,
                     ema_update_after=update_after_step)
        assert worst_error(early, ref, range(update_after_step + 1, T)) > 1e-3


def test_timm_model_ema_v3_without_step():
    """update(model) without a step: the decay is d from the first call, from the copy θ_0."""
    ref = timm_model_ema_v3(TRAJ, 0.97, 0, False, pass_step=False)
    assert_equal_at(ours("ema", ema_decay=0.97, ema_update_after=0), ref, range(1, T))


# torch.optim.swa_utils.AveragedModel, run itself (in float64): its first update_parameters copies
# the parameters, later ones average; called at our acting steps s = τ + jφ. Constructed before
# training and updated after every step, it starts at θ_1: swa_start / ema_update_after 1.

def averaged_model(traj, avg_fn, calls):
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.zeros(P, dtype=torch.float64))
    averaged = AveragedModel(module, multi_avg_fn=avg_fn)
    out = {}
    for s in calls:
        with torch.no_grad():
            module.w.copy_(traj[s])
        averaged.update_parameters(module)
        out[s] = averaged.module.w.detach().clone()
    return out


@pytest.mark.parametrize("start,freq", [(1, 1), (30, 4)])
def test_averaged_model(start, freq):
    calls = list(range(start, T, freq))
    swa = averaged_model(TRAJ, get_swa_multi_avg_fn(), calls)
    assert_equal_at(ours("swa", swa_start=start, swa_freq=freq), swa, calls)
    ema = averaged_model(TRAJ, get_ema_multi_avg_fn(0.95), calls)
    assert_equal_at(ours("ema", ema_decay=0.95, ema_update_after=start, ema_update_freq=freq),
                    ema, calls)


# ==================================================================================== LAWA
# LAWA's lawa.py (sanyalsunny111/Early_Weight_Avg): the checkpoint files sorted by step, cut into
# consecutive chunks of 5, each chunk's uniform mean (a running mean) saved at its last file.

def lawa_chunks(traj, checkpoint_steps, chunk=5):
    out = {}
    for i in range(0, len(checkpoint_steps), chunk):
        files = checkpoint_steps[i:i + chunk]
        mean = traj[files[0]].clone()
        for n, s in enumerate(files[1:], start=2):
            mean = mean + (traj[s] - mean) / n
        out[files[-1]] = mean
    return out


@pytest.mark.parametrize("start,spacing", [(0, 10), (3, 7)])
def test_lawa_py_chunks(start, spacing):
    """Our sliding window (k = 5, Δ = the checkpoint spacing) read at each full chunk's last
    checkpoint; lawa.py's last, partial chunk (fewer than 5 files) has no counterpart."""
    files = list(range(start, T, spacing))
    ref = lawa_chunks(TRAJ, files)
    full_chunk_ends = [files[i + 4] for i in range(0, len(files) - 4, 5)]
    got = ours("lawa", lawa_k=5, lawa_interval=spacing, lawa_start=start)
    assert_equal_at(got, ref, full_chunk_ends)
    if len(files) % 5:   # the partial chunk: the mean of fewer, not of the latest 5
        assert worst_error(got, ref, [files[-1]]) > 1e-3


# LAWA's SWA (nanoGPT2-Experiments/swa_utils.py), update() after every optimizer step: call c
# (θ_{c+1}) acts when c % update_every = 0; at c <= update_after_step it copies θ; the first later
# acting call copies θ again, then every acting call takes the running mean.

def lawa_repo_swa(traj, update_after_step, update_every):
    avg, n, initted, out = traj[0].clone(), 0, False, {}
    for c in range(len(traj) - 1):
        theta = traj[c + 1]
        if c % update_every:
            continue
        if c <= update_after_step:
            avg = theta.clone()
            continue
        if not initted:
            avg, initted = theta.clone(), True
        avg = avg + (theta - avg) * (1 - n / (n + 1))
        n += 1
        out[c + 1] = avg.clone()
    return out


@pytest.mark.parametrize("update_after_step,update_every", [(0, 10), (25, 4)])
def test_lawa_repo_swa(update_after_step, update_every):
    """swa_start = the first acting call past update_after_step, plus 1 (θ_11 in their run)."""
    first_call = (update_after_step // update_every + 1) * update_every
    ref = lawa_repo_swa(TRAJ, update_after_step, update_every)
    assert min(ref) == first_call + 1
    got = ours("swa", swa_start=first_call + 1, swa_freq=update_every)
    assert_equal_at(got, ref, sorted(ref))


# LAWA's EMA (nanoGPT2-Experiments/train_small.py, the same class EMA in train_medium.py and
# train_large.py; as their runs use it: beta 0.9, update_after_step 0, update_every 1,
# inv_gamma 1, power 2/3): call c copies θ_{c+1} at c = 0 and again at c = 1 (first
# initialisation); from c = 2 on, decay min(β, 1 − (1 + c)^−p).

def lawa_repo_ema(traj, beta=0.9, power=2 / 3, inv_gamma=1.0):
    ema, out = None, {}
    for c in range(len(traj) - 1):
        theta = traj[c + 1]
        if c <= 1:
            ema = theta.clone()    # c = 0: the update_after_step copy; c = 1: the init copy
        else:
            epoch = c              # its step counter is already c + 1 here: c + 1 − 0 − 1
            decay = min(beta, max(1 - (1 + epoch / inv_gamma) ** -power, 0.0))
            ema = ema + (1 - decay) * (theta - ema)
        out[c + 1] = ema.clone()
    return out


def test_lawa_repo_ema_has_no_exact_mapping():
    """Closest: ema_update_after 1 with warmup (decay 0.9, p 2/3): the same decays from step 3
    on, but at step 2 theirs copies θ_2 where ours keeps θ_1 with weight 1 − 2^(−2/3) ≈ 0.37.
    Pinned on this toy run: 8e-3 of max|θ| at step 2, 4e-4 at step 10, then shrinking by at
    least 0.9 per step, below float32 rounding from step 80 on."""
    ref = lawa_repo_ema(TRAJ)
    got = ours("ema", ema_decay=0.9, ema_warmup=True)
    assert 5e-3 < relative_error(got[2], ref[2]) < 2e-2
    assert 1e-4 < relative_error(got[10], ref[10]) < 1e-3
    assert_equal_at(got, ref, range(80, T))


# ===================================================================================== epfml
# epfml/schedules-and-scaling, src/optim/weight_averaging.py. WeightAverager.step after every
# optimizer step: call c (θ_{c+1}) samples when c % Δ = 0 into the window holding c, with rate
# 1/((c mod H)/Δ + 1) (the first sample of a window replaces it); after the call, when c + 1 is a
# multiple of H the window is saved as window (c + 1). At iteration k, get_latest_like returns
# window k − k mod H; sweep_horizon_like's n-th model averages the n latest saved windows.

def epfml_weight_averager(traj, interval, horizon, n_windows):
    avg, saved, out = traj[0].clone(), {}, {}
    for c in range(len(traj) - 1):
        if c % interval == 0:
            avg = torch.lerp(avg, traj[c + 1], 1 / ((c % horizon) // interval + 1))
        k = c + 1                              # iterations done
        if k % horizon == 0:
            saved[k] = avg.clone()
        latest = k - k % horizon
        if latest // horizon >= n_windows:     # n windows saved: its n-th sweep model
            out[k] = sum(saved[latest - j * horizon] for j in range(n_windows)) / n_windows
    return out


@pytest.mark.parametrize("interval,horizon,n_windows", [(5, 50, 1), (5, 50, 3), (1, 20, 2)])
def test_epfml_weight_averager(interval, horizon, n_windows):
    """wa_start 1 (our default), wa_interval Δ, wa_horizon H, wa_windows n; equal at the
    multiples of H (where epfml saves windows) and, for Δ = 1, at every step."""
    ref = epfml_weight_averager(TRAJ, interval, horizon, n_windows)
    got = ours("wa", wa_interval=interval, wa_horizon=horizon, wa_windows=n_windows)
    at = sorted(ref) if interval == 1 else [k for k in sorted(ref) if k % horizon == 0]
    assert_equal_at(got, ref, at)
    if interval > 1:   # between those, ours already has the window whose last sample is in
        between = [k for k in sorted(ref) if k % horizon > horizon - interval]
        assert worst_error(got, ref, between) > 1e-3
    old_phase = ours("wa", wa_interval=interval, wa_horizon=horizon, wa_windows=n_windows,
                     wa_start=0)
    assert worst_error(old_phase, ref, at) > 1e-3


# ExponentialWeightAverager (same file): calls c < warmup skip, c = warmup copies θ_{c+1}, later
# calls with c % interval = 0 take e ← lerp(e, θ_{c+1}, 1 − d).

def epfml_ema(traj, interval, decay, warmup):
    ema, out = None, {}
    for c in range(len(traj) - 1):
        if c < warmup:
            continue
        if c == warmup:
            ema = traj[c + 1].clone()
        elif c % interval == 0:
            ema = torch.lerp(ema, traj[c + 1], 1 - decay)
        else:
            continue
        out[c + 1] = ema.clone()
    return out


@pytest.mark.parametrize("interval,warmup", [(1, 0), (4, 8)])
def test_epfml_exponential_weight_averager(interval, warmup):
    """ema_update_after = warmup + 1, ema_update_freq = interval (interval dividing warmup)."""
    ref = epfml_ema(TRAJ, interval, 0.95, warmup)
    got = ours("ema", ema_decay=0.95, ema_update_after=warmup + 1, ema_update_freq=interval)
    assert_equal_at(got, ref, sorted(ref))


# wsd_schedule (src/optim/utils.py): n_anneal = int(fract_decay·N), n_hold = N − n_anneal;
# warmup s/w + (1 − s/w)/init_div for s < w; 1 until n_hold; then final + (1 − final)·f(x),
# x = (s − n_hold)/n_anneal, until N; final after.

EPFML_SHAPES = {"linear": lambda x: 1 - x, "cosine": lambda x: 0.5 * (1 + math.cos(math.pi * x)),
                "sqrt": lambda x: 1 - math.sqrt(x), "square": lambda x: 1 - x * x}
OUR_SHAPE = {"linear": "linear", "cosine": "cosine", "sqrt": "1-sqrt", "square": "square"}


def epfml_wsd(step, n_iterations, final_lr_factor, n_warmup, fract_decay, decay_type,
              init_div_factor=100):
    n_anneal = int(fract_decay * n_iterations)
    n_hold = n_iterations - n_anneal
    if step < n_warmup:
        return step / n_warmup + (1 - step / n_warmup) / init_div_factor
    if step < n_hold:
        return 1.0
    if step < n_iterations:
        return final_lr_factor + (1 - final_lr_factor) * EPFML_SHAPES[decay_type](
            (step - n_hold) / n_anneal)
    return final_lr_factor


@pytest.mark.parametrize("decay_type", sorted(EPFML_SHAPES))
@pytest.mark.parametrize("n,frac,final,warmup", [(1003, 0.2, 0.0, 0), (1003, 0.2, 0.1, 50),
                                                 (200, 0.37, 0.0, 10)])
def test_epfml_wsd_schedule(decay_type, n, frac, final, warmup):
    """Equal at every step from the end of the warmup (ours (s+1)/(w+1), theirs from peak/100)."""
    schedule = LRSchedule("wsd", max_iters=n, warmup_iters=warmup, cooldown_frac=frac,
                          cooldown_shape=OUR_SHAPE[decay_type], final_lr_frac=final)
    for step in range(warmup, n + 5):
        ref = epfml_wsd(step, n, final, warmup, frac, decay_type)
        assert schedule(step) == pytest.approx(ref, rel=1e-12, abs=1e-15), f"step {step}"


# ============================================================ power-function EMA and post-hoc
# EDM2 (NVlabs/edm2, training/phema.py). A width σ_rel is the exponent γ of the largest real
# root of γ³ + 7γ² + (16 − σ_rel⁻²)γ + 12 − σ_rel⁻² (np.roots). PowerFunctionEMA copies the
# network (θ_0) when built; after each optimizer step the training loop calls
# update(cur_nimg, batch_size) with cur_nimg = s·B, the images seen: e ← lerp(e, θ_s, 1 − β),
# β = (1 − B/cur_nimg)^(γ+1). Time is in images there, in steps here; the ratio is the same.

def edm2_gamma(sigma_rel):
    root = sigma_rel ** -2
    return float(np.roots([1.0, 7.0, 16.0 - root, 12.0 - root]).real.max())


def edm2_power_function_ema(traj, sigma_rel, batch_size, dtype=torch.float64):
    gamma = edm2_gamma(sigma_rel)
    ema, out = traj[0].to(dtype), {}
    for s in range(1, len(traj)):
        beta = (1 - batch_size / (s * batch_size)) ** (gamma + 1)
        ema = torch.lerp(ema, traj[s].to(dtype), 1 - beta)
        out[s] = ema.double()
    return out


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10])
@pytest.mark.parametrize("batch_size", [1, 2048])
def test_edm2_power_function_ema(sigma_rel, batch_size):
    """phema with EDM2's σ_rel, from θ_0 (burn-in 0), every step: equal; in float32, as EDM2
    keeps its averages, bitwise (its decay 1 − Δ/t and our t_prev/t round to the same float32
    weight). One update late (burn-in 1) is another average: 1e-3 at worst on this run."""
    ref = edm2_power_function_ema(TRAJ, sigma_rel, batch_size)
    got = ours("phema", phema_sigma_rel=sigma_rel)
    assert_equal_at(got, ref, range(1, T))
    ref32 = edm2_power_function_ema(TRAJ, sigma_rel, batch_size, dtype=torch.float32)
    assert all(torch.equal(got[s], ref32[s]) for s in range(1, T))
    late = ours("phema", phema_sigma_rel=sigma_rel, phema_update_after=1)
    assert worst_error(late, ref, range(2, T)) > 5e-4


# ema-pytorch (lucidrains/ema-pytorch 0.7.9, ema_pytorch/post_hoc_ema.py), KarrasEMA: γ from
# σ_rel by the same root as EDM2's; a counter k (0 at construction) that update() reads and then
# increments, called after each optimizer step (so call c sees θ_{c+1}); the call acts when
# k % update_every = 0; its first acting call copies θ; an acting call lerps with weight 1 − β,
# β = (1 − 1/(k + 2))^(γ+1): the beta property reads the counter already incremented.

def karras_ema(traj, gamma, update_every=1, counter=0):
    ema, out = None, {}
    for c in range(len(traj) - 1):
        k = counter + c
        if k % update_every:
            continue
        theta = traj[c + 1]
        ema = theta.clone() if ema is None else ema
        ema = torch.lerp(ema, theta, 1 - (1 - 1 / (k + 2)) ** (gamma + 1))
        out[c + 1] = ema.clone()
    return out


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10])
def test_ema_pytorch_karras_ema_is_one_update_ahead(sigma_rel):
    """update_every 1. Its decay at θ_s is ours at θ_{s+1}: after s steps it holds the profile
    of time s + 1 with θ_1 standing for (0, 2] (ours fed θ_1 twice: at snapshot steps 0, 2, 3,
    ... holding θ_0, θ_1, θ_2, ...); with its counter started at −1 it is ours with the same
    iterates (bitwise in float32). As published it differs from that by one update."""
    gamma = edm2_gamma(sigma_rel)
    ref = karras_ema(TRAJ, gamma)
    assert sorted(ref) == list(range(1, T))
    one_lower = karras_ema(TRAJ, gamma, counter=-1)
    same_iterates = ours("phema", phema_sigma_rel=sigma_rel)
    assert_equal_at(same_iterates, one_lower, range(1, T))
    one_lower32 = karras_ema(TRAJ.float(), gamma, counter=-1)      # bitwise in float32
    assert all(torch.equal(same_iterates[s], one_lower32[s].double()) for s in range(1, T))
    shifted = torch.cat([TRAJ[:1], TRAJ[:-1]])           # step u holds θ_{u−1}
    twice = ours("phema", steps=[0, *range(2, T)], allow_gaps=True, traj=shifted,
                 phema_sigma_rel=sigma_rel)
    assert_equal_at({s: twice[s + 1] for s in range(1, T - 1)}, ref, range(1, T - 1))
    assert 5e-4 < worst_error(same_iterates, ref, range(1, T)) < 5e-3


def test_ema_pytorch_karras_ema_update_every_is_not_a_power_function_ema():
    """update_every E > 1 (its default 100): each acting call still applies the decay of one
    step, ((k + 1)/(k + 2))^(γ+1), so the average keeps far more of its early samples than a
    power-function EMA: ≈ weights ∝ x^((γ+1)/E − 1), falling with x when E > γ + 1. Read
    off with a probe trajectory θ_s = (s, [s = 1]): its average is (the mean step, the weight
    of θ_1). σ_rel 0.05, E 100, after 10⁴ steps: mean 0.15·s and 40% on θ_1; our phema over
    the same samples (burn-in 1, every E steps, so θ_1 is the copy it starts from): 0.95·s and
    0."""
    every, steps, sigma_rel = 100, 10_000, 0.05
    probe = torch.zeros(steps + 1, 2, dtype=torch.float64)
    probe[:, 0] = torch.arange(steps + 1)
    probe[1, 1] = 1.0
    ref = karras_ema(probe, edm2_gamma(sigma_rel), update_every=every)
    last = max(ref)                                    # 9901: its last sample
    mean_step, weight_first = ref[last].tolist()
    assert 0.15 < mean_step / last < 0.16 and 0.38 < weight_first < 0.42
    got = run_averager(build_averager("phema", phema_sigma_rel=sigma_rel, phema_update_after=1,
                                      phema_update_freq=every), probe)[last]
    assert 0.95 < got[0].item() / last < 0.955 and got[1].item() == 0.0


# EDM2's post-hoc reconstruction (training/phema.py, solve_posthoc_coefficients, called by
# reconstruct_phema.py): of the stored averages (time t_i in images, width σ_i) those with
# 0 < t_i <= t_r enter; A_ik = ⟨p_i, p_k⟩, b_i = ⟨p_i, p_r⟩ with the continuous profiles' inner
# product (γ_a+1)(γ_b+1)/(γ_a+γ_b+1) · (t_a/t_b)^γ_b / t_b for t_a <= t_b; c = A⁻¹b
# (np.linalg.solve) divided by its sum; the reconstruction is Σ_i c_i e_i.

def continuous_inner_product(t_a, gamma_a, t_b, gamma_b):
    if t_a > t_b:
        t_a, gamma_a, t_b, gamma_b = t_b, gamma_b, t_a, gamma_a
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_a / t_b) ** gamma_b / t_b


def edm2_posthoc(times, sigma_rels, t_r, sigma_rel_r):
    """(indices of the stored averages that enter, their coefficients)."""
    used = [i for i, t in enumerate(times) if 0 < t <= t_r]
    profiles = [(times[i], edm2_gamma(sigma_rels[i])) for i in used]
    a = np.array([[continuous_inner_product(*p, *q) for q in profiles] for p in profiles])
    b = np.array([continuous_inner_product(*p, t_r, edm2_gamma(sigma_rel_r)) for p in profiles])
    c = np.linalg.solve(a, b)
    return used, c / c.sum()


def stored_phemas(widths, every):
    """Our phema averagers of these widths from θ_0 on TRAJ, read every `every` steps:
    [(step, σ_rel, float64 average)] in step order."""
    averagers = {w: build_averager("phema", phema_sigma_rel=w) for w in widths}
    theta, stored = torch.empty(P), []
    for s in range(T):
        theta.copy_(TRAJ[s])
        for w, avg in averagers.items():
            avg.update(s, theta)
            if s and s % every == 0:
                stored.append((s, w, avg.average().double().clone()))
    return stored


@pytest.mark.parametrize("every,t_r,sigma_rel_r", [(10, 300, 0.15), (10, 150, 0.02),
                                                   (30, 270, 0.25), (100, 300, 0.2)])
def test_edm2_posthoc_reconstruction(every, t_r, sigma_rel_r):
    """posthoc.solve_coefficients(exact=False) over the stored averages at or before t_r (EDM2
    leaves later ones out, ours refuses them) is EDM2's solve, in steps where EDM2 counts images
    (B = 2048: the coefficients do not depend on the unit); synthesize of them is its
    reconstruction. Our default, exact=True, is another fit: it differs where profiles are few
    updates wide (docs/averaging.md measures by how much)."""
    stored = stored_phemas((0.05, 0.10), every)
    batch = 2048
    used, c_ref = edm2_posthoc([s * batch for s, _, _ in stored], [w for _, w, _ in stored],
                               t_r * batch, sigma_rel_r)
    kept = [stored[i] for i in used]
    assert [s for s, _, _ in kept] == [s for s, _, _ in stored if s <= t_r]
    profiles = [(s, sigma_rel_to_gamma(w)) for s, w, _ in kept]
    target = (t_r, sigma_rel_to_gamma(sigma_rel_r))
    c = solve_coefficients(profiles, target, exact=False)
    assert np.abs(c - c_ref).max() <= 1e-9 * np.abs(c_ref).max()
    reference = sum(ci * e for ci, e in zip(c_ref, (e for _, _, e in kept)))
    got = synthesize(c, (e.float() for _, _, e in kept)).double()
    assert relative_error(got, reference) <= TOL
    exact = solve_coefficients(profiles, target)
    assert np.abs(exact - c_ref).max() > 1e-6 * np.abs(c_ref).max()


# ema-pytorch's PostHocEMA (same file): a KarrasEMA per width; every checkpoint_every_num_steps
# calls each one's state is saved as a file (width, S), S its counter after the call; for a
# target (γ_r, S_r; S_r defaults to the largest S) synthesize_ema_model takes EVERY file,
# solve_weights builds A and b from EDM2's inner product (p_dot_p) of t = S and γ held in
# float32 tensors, and returns w = A⁻¹b (torch.linalg.solve) without rescaling; the
# reconstruction is Σ_i w_i e_i.

def ema_pytorch_solve_weights(stored, target):
    t = [float(s) for s, _ in stored]
    gamma = torch.tensor([g for _, g in stored], dtype=torch.float32).double().tolist()
    t_r, gamma_r = target[0], torch.tensor(target[1], dtype=torch.float32).item()
    a = np.array([[continuous_inner_product(*p, *q) for q in zip(t, gamma)]
                  for p in zip(t, gamma)])
    b = np.array([continuous_inner_product(*p, t_r, gamma_r) for p in zip(t, gamma)])
    return np.linalg.solve(a, b)


@pytest.mark.parametrize("widths,every,sigma_rel_r,sum_low,sum_high", [
    ((0.05, 0.28), 10, 0.15, 1.0, 1.0 + 1e-5),     # its README's widths, 30 files of each
    ((0.05, 0.28), 100, 0.15, 1.001, 1.01),        # 3 of each
    ((0.05, 0.10), 30, 0.2, 0.98, 0.995),          # EDM2's widths, 10 of each
])
def test_ema_pytorch_post_hoc_ema_solve_weights(widths, every, sigma_rel_r, sum_low, sum_high):
    """Its weights are ours (solve_coefficients with exact=False) times their sum: ours are
    rescaled to sum 1 as EDM2's are, its are not, so its reconstruction is ours scaled by Σ w,
    which misses 1 by as much as the fit misses the target."""
    gammas = [sigma_rel_to_gamma(w) for w in widths]
    stored = [(s, g) for s in range(every, T, every) for g in gammas]
    target = (300, sigma_rel_to_gamma(sigma_rel_r))
    w = ema_pytorch_solve_weights(stored, target)
    c = solve_coefficients(stored, target, exact=False)
    assert np.abs(w - c * w.sum()).max() <= 1e-6 * np.abs(w).max()   # its γ in float32
    assert sum_low < w.sum() < sum_high


def test_ema_pytorch_post_hoc_ema_uses_later_files():
    """A target step before its last files: it solves with every file, so averages of
    iterates after the target enter (weight up to 1.9 here); ours takes only the files at or
    before it (solve_coefficients refuses later ones)."""
    gammas = [sigma_rel_to_gamma(w) for w in (0.05, 0.28)]
    stored = [(s, g) for s in range(100, T, 100) for g in gammas]
    target = (150, sigma_rel_to_gamma(0.15))
    before = [p for p in stored if p[0] <= target[0]]
    w = ema_pytorch_solve_weights(stored, target)
    assert 1.0 < np.abs(w[len(before):]).max() < 3.0
    assert np.abs(w[:len(before)] - solve_coefficients(before, target, exact=False)).max() > 0.1
    with pytest.raises(ValueError, match="after the target"):
        solve_coefficients(stored, target, exact=False)


# ============================================================================== Coupled Adam
# flxst/coupled-adam: AdamW on the matrices (weight decay λ), the vectors (0) and, in a group and
# optimizer of its own, the tied embedding, undecayed in both of the paper's runs (embdecay =
# False). CoupledAdam differs from AdamW in one line of its foreach path: the second moment fed
# to the denominator is c·(its mean over the vocabulary rows), broadcast to every row; the state
# itself stays per element.

def reference_adam(params, grads, lrs, decays, coupled, scale, betas=(0.9, 0.95), eps=1e-8):
    params = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, (step_grads, lr) in enumerate(zip(grads, lrs), start=1):
        for i, g in enumerate(step_grads):
            g = g.double()
            params[i] = params[i] * (1 - lr * decays[i])
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            second = scale * v[i].mean(dim=0, keepdim=True).expand_as(v[i]) if coupled[i] else v[i]
            denom = second.sqrt() / math.sqrt(1 - betas[1] ** t) + eps
            params[i] = params[i] - lr / (1 - betas[0] ** t) * m[i] / denom
    return params


@pytest.mark.parametrize("optimizer,scale", [("adamw", 1.0), ("coupled_adam", 1.0),
                                             ("coupled_adam", 4.0)])
def test_coupled_adam_comparison(optimizer, scale):
    """Both runs of the paper's comparison: configure_optimizers(embedding_weight_decay=0)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=40, n_layer=1, n_head=2, n_embd=16))
    params = list(model.parameters())
    g = torch.Generator().manual_seed(1)
    rows = torch.logspace(-3, 0, 40, dtype=torch.float64)[:, None]   # rare to frequent tokens
    grads = [[torch.randn(p.shape, generator=g, dtype=torch.float64)
              * (rows if p is model.transformer.wte.weight else 1.0) for p in params]
             for _ in range(6)]
    lrs = [3e-3, 1e-2, 8e-3, 5e-3, 2e-3, 1e-3]
    embedding = model.transformer.wte.weight
    decays = [0.0 if p is embedding or p.dim() < 2 else 0.1 for p in params]
    coupled = [optimizer == "coupled_adam" and p is embedding for p in params]
    ref = reference_adam(params, grads, lrs, decays, coupled, scale)
    start = [p.detach().double().clone() for p in params]
    opt = model.configure_optimizers(0.1, lrs[0], (0.9, 0.95), "cpu", optimizer=optimizer,
                                     coupled_adam_scale=scale, embedding_weight_decay=0.0)
    for step_grads, lr in zip(grads, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        for p, grad in zip(params, step_grads):
            p.grad = grad.float()
        opt.step()
    for p, r, p0 in zip(params, ref, start):
        moved = (r - p0).abs().max().item()
        err = (p.detach().double() - r).abs().max().item()
        assert err <= 1e-5 * moved + 1e-7, f"{tuple(p.shape)}: {err:.3g} of a move of {moved:.3g}"


# ====================================================================== tooMuchInCommon
# The Coupled Adam authors' isotropy (nanoGPT/analysis/isotropy.py, as in tooMuchInCommon): for
# each eigenvector c of E^T E from np.linalg.eig, Z(c) = Σ_i exp(c^T e_i) with the sign the solver
# returned; I = min Z / max Z over every row of E. Their norm–frequency correlation
# (analysis/lbp.py, script_analyze.py): Pearson r of ||e_i|| with log(p_i + 1e-10), p the unigram
# probability of the training data padded with 0 to every row of E.

def too_much_in_common_isotropy(E):
    E = np.asarray(E, dtype=np.float64)
    _, vectors = np.linalg.eig(E.T @ E)
    zs = [np.exp(E @ np.real(vectors[:, i])).sum() for i in range(vectors.shape[1])]
    return min(zs) / max(zs)


def pearson(x, y):
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum()))


def test_too_much_in_common_isotropy_and_correlation():
    g = torch.Generator().manual_seed(2)
    tokens, padding, width = 300, 12, 16
    E = 0.5 * torch.randn(tokens + padding, width, generator=g, dtype=torch.float64)
    E[:, 3] += 0.4                                      # a common direction
    counts = torch.randint(0, 40, (tokens,), generator=g).numpy()
    counts[:5] = 0                                      # tokens that never occur
    reference = too_much_in_common_isotropy(E.numpy())
    assert isotropy_solver_sign(E) == pytest.approx(reference, rel=1e-12)
    assert isotropy(E) < reference                      # ± every eigenvector: a min over more
    probability = np.zeros(tokens + padding)
    probability[:tokens] = counts / counts.sum()
    ref_r = pearson(E.norm(dim=1).numpy(), np.log(probability + 1e-10))
    assert norm_logprob_correlation_all_rows(E, counts) == pytest.approx(ref_r, rel=1e-12)
    # embedding_metrics reports both conventions, the reference's over every row of E
    metrics = embedding_metrics(E.float(), counts, vocab_size=tokens)
    assert metrics["isotropy_solver_sign_all_rows"] == pytest.approx(reference, rel=1e-5)
    assert metrics["norm_logprob_pearson_all_rows"] == pytest.approx(ref_r, rel=1e-5)
    assert metrics["isotropy"] == pytest.approx(isotropy(E.float()[:tokens]), rel=1e-12)
