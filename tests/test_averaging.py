"""averaging.py against independent float64 references (plain loops written from the spec; they
never call averaging.py) and against torch.optim.swa_utils.AveragedModel.

The trajectory is a drifting random walk of T = 1001 steps (not a multiple of any period used),
fed as ONE tensor mutated in place each step, as the training loop does. float32 state over ~1000
updates of O(1) values: tolerances are a few 1e-6 of the largest |value|; every convention error
tested here (a one-step time shift, an aliased θ₀, a wrong window) is 1e-4 or larger.
"""

import io

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn
from trajectories import random_walk, run_averager

import averaging
from averaging import AVERAGERS, build_averager

T, P = 1001, 67


def trajectory(seed=0, T=T, P=P):
    return random_walk(seed, T, P, first_step=False)


TRAJ = trajectory()


def run(avg, traj=TRAJ, dtype=torch.float32, steps=None):
    return run_averager(avg, traj, steps, dtype)


def assert_matches(got, ref, tol=2e-6):
    """got, ref: {step: tensor or None}; equal None-ness, then max error <= tol * max|ref|."""
    assert got.keys() == ref.keys()
    worst = 0.0
    for s in ref:
        if ref[s] is None:
            assert got[s] is None, f"step {s}: expected no average yet"
            continue
        assert got[s] is not None, f"step {s}: no average"
        err = (got[s] - ref[s]).abs().max().item() / max(1.0, ref[s].abs().max().item())
        worst = max(worst, err)
        assert err <= tol, f"step {s}: relative error {err:.3g} > {tol}"
    return worst


def acting(s, tau, phi):
    return s >= tau and (s - tau) % phi == 0


# ----------------------------------------------------------------------- float64 references

def ref_power_ema(traj, tau, phi, output, kappa=0.5, rho=10.0, gamma=1.0, beta_min=0.0):
    """Generic loop for BEMA-like methods: state initialised to θ_τ; at acting t > 0,
    β = max((ρ+γt)^-κ, β_min) (κ < 0: β = 1), e ← (1−β)e + βθ, out = output(t, b, e, θ, θ_τ)."""
    res, cur = {}, None
    for s in range(len(traj)):
        th = traj[s]
        if s == tau:
            th0, e, cur = th.clone(), th.clone(), th.clone()
        elif acting(s, tau, phi):
            t = s - tau
            b = rho + gamma * t
            beta = 1.0 if kappa < 0 else max(b ** -kappa, beta_min)
            e = (1 - beta) * e + beta * th
            cur = output(t, b, e, th, th0)
        res[s] = None if cur is None else cur.clone()
    return res


def bema_ref(traj, tau=0, phi=1, kappa=0.5, eta=0.2, rho=10.0, gamma=1.0, beta_min=0.0):
    return ref_power_ema(traj, tau, phi, lambda t, b, e, th, th0: e + b ** -eta * (th - th0),
                         kappa, rho, gamma, beta_min)


# ------------------------------------------------------------------------------------ BEMA

def test_bema_with_burn_in_matches_reference_and_theta0_is_a_copy():
    tau = 37
    avg = build_averager("bema", bema_update_after=tau, bema_update_freq=1)
    got = run(avg)
    assert_matches(got, bema_ref(TRAJ, tau=tau))
    # θ₀ is θ_τ although the tensor passed at step τ now holds θ_T−1 (the published tool's bug:
    # aliasing θ₀ to the live tensor makes θ − θ₀ = 0 and the correction silently vanishes).
    assert torch.equal(avg.theta0, TRAJ[tau].float())
    assert not torch.equal(avg.theta0, TRAJ[-1].float())


def test_bema_time_index_convention():
    """t = s − τ: the first update after initialisation uses b = ρ + γ·φ (TRL with τ = 0)."""
    tau, phi, rho, gamma = 3, 2, 10.0, 0.5
    x0, x1 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    avg = build_averager("bema", bema_update_after=tau, bema_update_freq=phi, bema_lag=rho,
                         bema_multiplier=gamma)
    avg.update(tau, x0)
    avg.update(tau + phi, x1)
    b = rho + gamma * phi
    e = (1 - b ** -0.5) * x0.double() + b ** -0.5 * x1.double()
    expect = e + b ** -0.2 * (x1.double() - x0.double())
    torch.testing.assert_close(avg.average().double(), expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tau,phi,beta_min", [(0, 7, 0.0), (5, 7, 0.05), (11, 1, 0.08)])
def test_bema_update_freq_and_min_multiplier(tau, phi, beta_min):
    avg = build_averager("bema", bema_update_after=tau, bema_update_freq=phi,
                         bema_min_ema_multiplier=beta_min, bema_lag=2.0, bema_multiplier=0.7)
    assert_matches(run(avg), bema_ref(TRAJ, tau, phi, rho=2.0, gamma=0.7, beta_min=beta_min))


def plain_power_ema(t, b, e, th, th0):       # bias_power < 0: α = 0
    return e.clone()


def no_ema_with_correction(t, b, e, th, th0):  # ema_power < 0: e = θ_s
    return th + b ** -0.2 * (th - th0)


def full_correction(t, b, e, th, th0):       # bias_power = 0: α = 1
    return e + (th - th0)


@pytest.mark.parametrize("hp,kappa,output", [
    (dict(bema_bias_power=-1.0), 0.5, plain_power_ema),
    (dict(bema_ema_power=-1.0), -1.0, no_ema_with_correction),
    (dict(bema_bias_power=0.0), 0.5, full_correction),
])
def test_bema_disable_conventions(hp, kappa, output):
    tau = 9
    avg = build_averager("bema", bema_update_after=tau, bema_update_freq=1, **hp)
    ref = ref_power_ema(TRAJ, tau, 1, output, kappa=kappa)
    assert_matches(run(avg), ref)
    if kappa < 0:   # e = θ_s exactly
        assert torch.equal(avg.e, TRAJ[-1].float())


def test_bema_without_correction_keeps_no_theta0():
    on = build_averager("bema")
    off = build_averager("bema", bema_bias_power=-1.0)
    run(on, steps=range(3))
    run(off, steps=range(3))
    assert on.memory_bytes() == 3 * 4 * P and off.memory_bytes() == 4 * P


def test_schedule_functions():
    assert averaging.bema_alpha(100, 0.0, 10.0, 1.0) == 1.0
    assert averaging.bema_alpha(100, -1.0, 10.0, 1.0) == 0.0
    assert averaging.bema_beta(100, -1.0, 10.0, 1.0) == 1.0
    assert averaging.bema_beta(90, 0.5, 10.0, 1.0) == pytest.approx(0.1)
    assert averaging.bema_beta(90, 0.5, 10.0, 1.0, 0.2) == 0.2
    assert averaging.ema_warmup_decay(0, 0.999, 2 / 3, 1.0) == 0.0
    assert averaging.ema_warmup_decay(7, 0.999, 2 / 3, 1.0) == pytest.approx(1 - 8 ** (-2 / 3))
    assert averaging.ema_warmup_decay(10**9, 0.999, 2 / 3, 1.0) == 0.999
    assert averaging.ouema_a(0, 0.2, 2.0, 1.0) == pytest.approx(2 ** -0.2)   # β_t's base b_t


# ------------------------------------------------------------------------------ EMA and SWA

def averaged_model_run(avg_fn, acting_steps, traj=TRAJ):
    """AveragedModel over a one-parameter module holding the flat vector. Its first
    update_parameters copies the parameters (n_averaged = 0): that is our initialisation at τ,
    so it is called exactly at our acting steps."""
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.zeros(traj.shape[1]))
    averaged = AveragedModel(module, multi_avg_fn=avg_fn)
    res, cur = {}, None
    for s in range(len(traj)):
        with torch.no_grad():
            module.w.copy_(traj[s])
        if s in acting_steps:
            averaged.update_parameters(module)
            cur = averaged.module.w.detach().double().clone()
        res[s] = cur
    return res


@pytest.mark.parametrize("tau,phi", [(0, 1), (13, 3)])
def test_ema_equals_averaged_model(tau, phi):
    avg = build_averager("ema", ema_decay=0.99, ema_update_after=tau, ema_update_freq=phi)
    steps = {s for s in range(T) if acting(s, tau, phi)}
    assert_matches(run(avg), averaged_model_run(get_ema_multi_avg_fn(0.99), steps), tol=1e-6)


def test_ema_warmup_matches_reference():
    tau, d, p, gw = 4, 0.99, 2 / 3, 3.0
    avg = build_averager("ema", ema_decay=d, ema_warmup=True, ema_warmup_power=p,
                         ema_warmup_gamma=gw, ema_update_after=tau)
    res, e = {}, None
    for s in range(T):
        if s == tau:
            e = TRAJ[s].clone()
        elif s > tau:
            dt = min(d, 1 - (1 + (s - tau) / gw) ** -p)
            e = dt * e + (1 - dt) * TRAJ[s]
        res[s] = None if e is None else e.clone()
    assert_matches(run(avg), res)


def test_swa_equals_averaged_model_and_the_mean():
    start, freq = 100, 10
    avg = build_averager("swa", swa_start=start, swa_freq=freq)
    steps = {s for s in range(T) if acting(s, start, freq)}
    got = run(avg)
    assert_matches(got, averaged_model_run(get_swa_multi_avg_fn(), steps), tol=1e-6)
    mean_ref = {s: (TRAJ[[k for k in sorted(steps) if k <= s]].mean(0) if s >= start else None)
                for s in range(T)}
    assert_matches(got, mean_ref)
    assert avg.n == len(steps)


# ------------------------------------------------------------------------------ DEMA, OUEMA

def test_dema_matches_reference():
    tau, phi = 6, 2
    avg = build_averager("dema", dema_update_after=tau, dema_update_freq=phi, dema_lag=3.0)
    res, cur = {}, None
    for s in range(T):
        if s == tau:
            e1, e2 = TRAJ[s].clone(), TRAJ[s].clone()
        elif acting(s, tau, phi):
            beta = (3.0 + (s - tau)) ** -0.5
            e1 = (1 - beta) * e1 + beta * TRAJ[s]
            e2 = (1 - beta) * e2 + beta * e1
        if s >= tau:
            cur = 2 * e1 - e2
        res[s] = cur
    assert_matches(run(avg), res)


def test_ouema_matches_reference():
    tau, phi, eta, rho = 20, 2, 0.3, 2.0
    avg = build_averager("ouema", ouema_update_after=tau, ouema_update_freq=phi,
                         ouema_bias_power=eta)
    res, e = {}, None
    for s in range(T):
        if s == tau:
            th0, e = TRAJ[s].clone(), TRAJ[s].clone()
        elif acting(s, tau, phi):
            b = rho + (s - tau)
            a = b ** -eta         # one time base b for a_t and β_t
            tilde = (TRAJ[s] - a * th0) / (1 - a)
            beta = b ** -0.5
            e = (1 - beta) * e + beta * tilde
        res[s] = None if e is None else e.clone()
    assert_matches(run(avg), res)


# ------------------------------------------------------------------------- LAWA and windows

@pytest.mark.parametrize("k,interval,start", [(5, 30, 7), (1, 4, 0), (3, 1, 2)])
def test_lawa_sliding_window(k, interval, start):
    avg = build_averager("lawa", lawa_k=k, lawa_interval=interval, lawa_start=start)
    got = run(avg)
    ref = {}
    for s in range(T):
        if s < start:
            ref[s] = None
            continue
        last = s - (s - start) % interval    # the latest snapshot step
        window = [last - j * interval for j in range(k) if last - j * interval >= start]
        ref[s] = TRAJ[window].mean(0)
    assert_matches(got, ref)
    assert avg.memory_bytes() == k * P * 4


def test_lawa_default_start_leaves_the_initial_weights_out():
    """Without lawa_start the first snapshot is one interval in (LAWA's checkpoints Δ, 2Δ, ...):
    θ_0, the random init in pretraining, never enters a window; the state carries the step."""
    avg = build_averager("lawa", lawa_k=3, lawa_interval=4)
    assert avg.tau == 4 and avg.hparams["lawa_start"] == 4
    got = run(avg, steps=range(14))
    assert all(got[s] is None for s in range(4))
    ref = {s: TRAJ[[t for t in (4, 8, 12) if t <= s - s % 4][-3:]].mean(0) for s in range(4, 14)}
    assert_matches({s: got[s] for s in range(4, 14)}, ref)
    resumed = build_averager("lawa", lawa_k=3, lawa_interval=4, lawa_start=None)
    resumed.load_state_dict(avg.state_dict())   # the same setting: the same resolved step
    with pytest.raises(ValueError, match="lawa_start"):
        build_averager("lawa", lawa_k=3, lawa_interval=4, lawa_start=0).load_state_dict(
            avg.state_dict())


@pytest.mark.parametrize("interval,horizon,windows,start", [(5, 50, 2, 3), (1, 40, 1, 0),
                                                            (7, 7, 3, 10)])
def test_windowed_average(interval, horizon, windows, start):
    avg = build_averager("wa", wa_interval=interval, wa_horizon=horizon, wa_windows=windows,
                         wa_start=start)
    got = run(avg)
    ref = {}
    for s in range(T):
        if s < start:
            ref[s] = None
            continue
        samples = [k for k in range(start, s + 1, interval)]
        by_window = {}
        for k in samples:
            by_window.setdefault((k - start) // horizon, []).append(k)
        done = [w for w, ks in by_window.items() if len(ks) == horizon // interval]
        if not done:
            ref[s] = TRAJ[samples].mean(0)
        else:
            keep = [k for w in sorted(done)[-windows:] for k in by_window[w]]
            ref[s] = TRAJ[keep].mean(0)
    assert_matches(got, ref)


# ------------------------------------------------------------------------ shared interface

CASES = {
    "ema": dict(ema_decay=0.95, ema_warmup=True, ema_update_after=3, ema_update_freq=2),
    "bema": dict(bema_update_after=17, bema_update_freq=3),
    "dema": dict(dema_update_after=5),
    "ouema": dict(ouema_update_after=2, ouema_update_freq=2),
    "swa": dict(swa_start=50, swa_freq=4),
    "lawa": dict(lawa_k=4, lawa_interval=9, lawa_start=1),
    "wa": dict(wa_interval=3, wa_horizon=33, wa_windows=2, wa_start=4),
    "phema": dict(phema_sigma_rel=None, phema_gamma=4.0, phema_update_after=5,
                  phema_update_freq=3),
}


def test_registry_covers_every_method():
    assert set(AVERAGERS) == set(CASES) == {"ema", "bema", "dema", "ouema", "swa", "lawa", "wa",
                                            "phema"}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("cut", [1, 500])
def test_state_round_trip_is_bitwise(name, cut):
    """Save mid-run (cut=1: before initialisation for most), load into a fresh averager with
    weights_only=True, continue: bitwise the run that never stopped."""
    uninterrupted = build_averager(name, **CASES[name])
    first = build_averager(name, **CASES[name])
    run(first, steps=range(cut))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = build_averager(name, **CASES[name])
    loaded = torch.load(buf, weights_only=True)
    saved = {k: v.clone() for k, v in loaded["tensors"].items()}
    resumed.load_state_dict(loaded)
    assert resumed.memory_bytes() == first.memory_bytes()
    a = run(uninterrupted)
    b = run(resumed, steps=range(cut, T))
    for s in range(cut, T):
        same = a[s] is None and b[s] is None or (
            a[s] is not None and b[s] is not None and torch.equal(a[s], b[s]))
        assert same, f"{name}: step {s} differs after resume at {cut}"
    # the loaded state must not alias the dict's tensors (nor the first averager's)
    assert all(torch.equal(loaded["tensors"][k], v) for k, v in saved.items())
    run(first, steps=range(cut, T))
    assert torch.equal(first.average(), resumed.average())


def test_load_rejects_other_hyperparameters_or_method():
    sd = build_averager("bema", bema_lag=10.0).state_dict()
    with pytest.raises(ValueError, match="bema_lag"):
        build_averager("bema", bema_lag=5.0).load_state_dict(sd)
    with pytest.raises(ValueError, match="bema"):
        build_averager("ema").load_state_dict(sd)


@pytest.mark.parametrize("name", ["bema", "swa", "lawa", "ema", "phema"])
def test_bf16_theta(name):
    """θ in bf16 (as a bf16 model would pass it): state stays float32 and matches the float64
    reference over the bf16-rounded trajectory."""
    traj = TRAJ.to(torch.bfloat16).double()
    hp = CASES[name]
    got = run(build_averager(name, **hp), traj=traj, dtype=torch.bfloat16)
    f32 = run(build_averager(name, **hp), traj=traj, dtype=torch.float32)
    for s in range(T):   # upcasting is exact, so bf16 input = float32 input of the same values
        assert (got[s] is None and f32[s] is None) or torch.equal(got[s], f32[s])
    if name == "bema":
        assert_matches(got, bema_ref(traj, tau=17, phi=3))
    avg = build_averager(name, **hp)
    run(avg, traj=traj, dtype=torch.bfloat16, steps=range(60))
    assert avg.average().dtype == torch.float32


@pytest.mark.parametrize("name", sorted(CASES))
def test_average_is_none_before_initialisation(name):
    avg = build_averager(name, **{**CASES[name], **{AVERAGERS[name].start_key: 10}})
    assert avg.average() is None and avg.memory_bytes() == 0
    got = run(avg, steps=range(11))
    assert all(got[s] is None for s in range(10)) and got[10] is not None
    assert torch.equal(got[10], TRAJ[10].float().double())   # every method starts at θ_τ


def test_update_must_see_initialisation_and_every_acting_step():
    avg = build_averager("ema", ema_update_after=5, ema_update_freq=2)
    x = torch.zeros(P)
    assert avg.update(4, x) is False
    with pytest.raises(RuntimeError, match="ema_update_after=5"):
        avg.update(7, x)
    assert avg.update(5, x) is True and avg.update(6, x) is False
    with pytest.raises(RuntimeError, match="expected step 7"):
        avg.update(9, x)


@pytest.mark.parametrize("name,hp,key", [
    ("dema", dict(dema_ema_power=1.0), "dema_ema_power"),
    ("dema", dict(dema_ema_power=-0.5), "dema_ema_power"),
    ("lawa", dict(lawa_k=0), "lawa_k"),
    ("lawa", dict(lawa_interval=0), "lawa_interval"),
    ("ouema", dict(ouema_bias_power=0.0), "ouema_bias_power"),
    ("ouema", dict(ouema_lag=0.0, ouema_multiplier=0.0), "ouema_lag"),
    ("ouema", dict(ouema_lag=0.0), "ouema_lag"),             # b_1 = 1: a_1 = 1 divides by 0
    ("bema", dict(bema_update_freq=0), "bema_update_freq"),
    ("bema", dict(bema_update_after=-1), "bema_update_after"),
    ("bema", dict(bema_lag=0.5, bema_multiplier=0.2, bema_update_freq=1), "bema_lag"),
    ("bema", dict(bema_multiplier=-1.0), "bema_multiplier"),
    ("bema", dict(bema_min_ema_multiplier=1.5), "bema_min_ema_multiplier"),
    ("bema", dict(bema_ema_power=float("nan")), "bema_ema_power"),
    ("bema", dict(bema_lagg=3.0), "bema_lagg"),
    ("ema", dict(ema_decay=1.0), "ema_decay"),
    ("ema", dict(ema_update_freq=2.0), "ema_update_freq"),
    ("ema", dict(ema_warmup="yes"), "ema_warmup"),
    ("ema", dict(ema_warmup_gamma=0.0), "ema_warmup_gamma"),
    ("swa", dict(swa_start=-3), "swa_start"),
    ("wa", dict(wa_interval=5, wa_horizon=12), "wa_horizon"),
    ("wa", dict(wa_windows=0), "wa_windows"),
    ("nope", {}, "nope"),
])
def test_validation_names_the_key(name, hp, key):
    with pytest.raises(ValueError, match=key):
        build_averager(name, **hp)


def test_pure_bema_step_with_bf16_theta():
    g = torch.Generator().manual_seed(1)
    ema, theta0 = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    theta = torch.randn(1000, generator=g).to(torch.bfloat16)
    e64, th64, t064 = ema.double(), theta.double(), theta0.double()
    out = torch.empty(1000)
    averaging.bema_step_(ema, theta, theta0, 0.3, 0.7, out)
    e_ref = 0.7 * e64 + 0.3 * th64
    torch.testing.assert_close(ema.double(), e_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.double(), e_ref + 0.7 * (th64 - t064), rtol=1e-6, atol=1e-6)


def test_allow_gaps_averages_the_steps_it_is_given_in_order():
    """The offline tool's mode: snapshots at some acting steps only; t is still s − τ."""
    tau, steps = 4, [4, 5, 9, 10, 30]
    avg = build_averager("bema", allow_gaps=True, bema_update_after=tau,
                         bema_update_freq=1)
    got = run(avg, steps=steps)
    th0 = e = TRAJ[tau]
    for s in steps[1:]:
        b = 10.0 + (s - tau)
        e = (1 - b ** -0.5) * e + b ** -0.5 * TRAJ[s]
    assert_matches({30: got[30]}, {30: e + b ** -0.2 * (TRAJ[30] - th0)})
    with pytest.raises(RuntimeError, match="after step 30"):
        avg.update(30, TRAJ[30].float())
    # steps that are not acting steps are still ignored
    swa = build_averager("swa", allow_gaps=True, swa_start=2, swa_freq=2)
    run(swa, steps=[2, 3, 6, 7, 12])
    assert_matches({0: swa.average().double()}, {0: TRAJ[[2, 6, 12]].mean(0)})


@pytest.mark.parametrize("horizon,windows", [(250, 1), (250, 2), (100, 1), (40, 1)])
def test_windowed_average_with_gaps_keeps_windows_in_steps(horizon, windows):
    """Offline: snapshots every 50 steps, wa_interval 1. A window of H steps holds the snapshots
    inside it and finishes when its last sample or a later window's first sample arrives."""
    steps = list(range(0, 1001, 50))
    avg = build_averager("wa", allow_gaps=True, wa_interval=1, wa_horizon=horizon,
                         wa_windows=windows, wa_start=0)
    got = run(avg, steps=steps)
    ref = {}
    for i, s in enumerate(steps):
        by_window = {}
        for k in steps[:i + 1]:
            by_window.setdefault(k // horizon, []).append(k)
        done = [w for w in by_window if w < s // horizon or s % horizon == horizon - 1]
        if not done:
            ref[s] = TRAJ[steps[:i + 1]].mean(0)
        else:
            ref[s] = TRAJ[[k for w in sorted(done)[-windows:] for k in by_window[w]]].mean(0)
    assert_matches(got, ref)
    if horizon == 250:      # 5 snapshots per window: no longer the running mean of everything
        assert not torch.allclose(got[1000], TRAJ[steps].mean(0))


def test_swapped_in_puts_the_average_into_the_model_and_restores_it():
    from wagpt.flat_params import FlatParameters
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    flat = FlatParameters(model)
    avg = build_averager("ema", ema_decay=0.5, ema_update_after=0)
    with pytest.raises(RuntimeError, match="no average yet"):
        avg.swapped_in(flat)
    live = flat.buffer.clone()
    avg.update(0, torch.randn_like(live))
    with avg.swapped_in(flat):
        assert torch.equal(flat.buffer, avg.average())
        assert torch.equal(model[0].weight.flatten(), avg.average()[:12])
    assert torch.equal(flat.buffer, live)


# ------------------------------------------------------------ offline time in training steps
# average.py's default (fill_gaps): a snapshot after a gap stands for every acting step since
# the previous snapshot, each with the snapshot's θ. Where θ is constant between snapshots this
# is exactly the online average; otherwise each offline weight sits on θ at the end of its gap
# instead of θ along it, so |offline − online| <= C · max_s |θ_s − θ(next snapshot)| <=
# C · (k − 1) · L over snapshots every k steps (L: the largest one-step move), with C = 1 where
# the weights are non-negative and sum to at most 1 (ema, bema, swa, phema), 3 for dema's
# 2e₁ − e₂, and 1/(1 − a_φ) for ouema's pull-back (θ enters divided by 1 − a_t).

GAP_METHODS = [
    ("ema", dict(ema_decay=0.99, ema_update_after=0)),
    ("ema", dict(ema_decay=0.999, ema_warmup=True, ema_update_after=0)),
    ("bema", dict(bema_update_freq=1)),
    ("bema", dict(bema_bias_power=-1.0, bema_update_freq=1)),
    ("dema", {}),
    ("ouema", {}),
    ("swa", {}),
    ("phema", dict(phema_sigma_rel=0.1)),
]
SPACINGS = (1, 2, 5, 10, 50)


def gap_constant(name, avg):
    if name == "dema":
        return 3.0
    if name == "ouema":
        return 1.0 / (1.0 - averaging.ouema_a(avg.phi, avg.bias_power, avg.lag, avg.multiplier))
    return 1.0


def held(traj, k):
    """The trajectory with θ held at the next multiple of k: what the offline average sees."""
    return traj[[min(-(-s // k) * k, len(traj) - 1) for s in range(len(traj))]]


def ema_float64(traj, decay):
    """The online EMA from θ_0, every step, in float64, from the definition."""
    e, out = traj[0].clone(), {0: traj[0].clone()}
    for s in range(1, len(traj)):
        e = decay * e + (1 - decay) * traj[s]
        out[s] = e.clone()
    return out


@pytest.mark.parametrize("name, hparams", GAP_METHODS, ids=lambda x: str(x))
def test_offline_time_in_steps_is_online_over_the_held_trajectory(name, hparams):
    """Exact where it should be: with θ constant between snapshots k steps apart, the offline
    average over the snapshots (one pass per snapshot) is the online one over every step."""
    for k in (2, 7, 50):
        snapshots = list(range(0, T, k))
        offline = run(build_averager(name, allow_gaps=True, fill_gaps=True, **hparams),
                      steps=snapshots)
        online = run(build_averager(name, **hparams), traj=held(TRAJ, k))
        assert_matches(offline, {s: online[s] for s in snapshots}, tol=5e-6)


@pytest.mark.parametrize("name, hparams", [
    ("bema", {}),                                      # φ = 400
    ("bema", dict(bema_update_freq=40)),
    ("ema", dict(ema_update_freq=30, ema_update_after=0)),
    ("dema", dict(dema_update_freq=40)),
    ("lawa", dict(lawa_interval=40, lawa_k=3)),
], ids=lambda x: str(x))
def test_snapshots_between_acting_steps_stand_for_the_last_one(name, hparams):
    """Snapshots need not fall on acting steps: the first snapshot after an acting step stands for
    it (θ held since then), as in the online run over the held trajectory (LAWA: while snapshots
    are closer than its interval; farther apart, a snapshot is one checkpoint of its window)."""
    for k in (7, 30) if name == "lawa" else (7, 50, 150):
        snapshots = list(range(0, T, k))
        offline = run(build_averager(name, allow_gaps=True, fill_gaps=True, **hparams),
                      steps=snapshots)
        online = run(build_averager(name, **hparams), traj=held(TRAJ, k))
        assert_matches(offline, {s: online[s] for s in snapshots}, tol=5e-6)


@pytest.mark.parametrize("name, hparams", GAP_METHODS, ids=lambda x: str(x))
def test_offline_time_in_steps_approximates_online_within_a_bound_that_shrinks_with_k(
        name, hparams):
    """float64: the offline average over snapshots every k steps against the online average
    over every step, within C · max |θ_s − θ(next snapshot)| <= C · (k − 1) · L."""
    moves = (TRAJ[1:] - TRAJ[:-1]).abs().max().item()   # L
    online = (ema_float64(TRAJ, hparams["ema_decay"])
              if name == "ema" and not hparams.get("ema_warmup") else
              run(build_averager(name, **hparams)))   # float64 references: the tests above
    errors = []
    for k in SPACINGS:
        snapshots = list(range(0, T, k))
        avg = build_averager(name, allow_gaps=True, fill_gaps=True, **hparams)
        offline = run(avg, steps=snapshots)
        deviation = (held(TRAJ, k) - TRAJ).abs().max().item()
        assert deviation <= (k - 1) * moves + 1e-12
        bound = gap_constant(name, avg) * deviation + 5e-6 * TRAJ.abs().max().item()
        error = max((offline[s] - online[s]).abs().max().item() for s in snapshots[1:])
        assert error <= bound, (k, error, bound)
        errors.append(error)
    assert errors[0] < 1e-5 and errors[-1] > errors[1]   # exact at k = 1, larger with k


def test_one_update_per_snapshot_is_the_explicit_alternative():
    """fill_gaps=False (average.py --offline_time=snapshots): an EMA's decay once per snapshot,
    an average of 1000 snapshots for d = 0.999, far outside the bound of the online EMA."""
    k, decay = 50, 0.999
    snapshots = list(range(0, T, k))
    per_snapshot = run(build_averager("ema", allow_gaps=True, ema_decay=decay,
                                      ema_update_after=0), steps=snapshots)
    reference = {0: TRAJ[0]}
    for previous, s in zip(snapshots, snapshots[1:]):
        reference[s] = decay * reference[previous] + (1 - decay) * TRAJ[s]
    assert_matches(per_snapshot, reference)
    online = ema_float64(TRAJ, decay)
    in_steps = run(build_averager("ema", allow_gaps=True, fill_gaps=True, ema_decay=decay,
                                  ema_update_after=0), steps=snapshots)
    error = (per_snapshot[1000] - online[1000]).abs().max().item()
    assert error > (held(TRAJ, k) - TRAJ).abs().max().item()   # outside the bound above
    assert error > 20 * (in_steps[1000] - online[1000]).abs().max().item()
