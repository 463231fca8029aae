"""Random trajectories θ_0..θ_{T-1} for the averaging tests: a random walk with drift in float64,
so averages lag behind the iterate and bias corrections have something to correct."""

import torch


def run_averager(avg, traj, steps=None, dtype=torch.float32):
    """Feed θ_s (s in steps, default all) through one tensor mutated in place, as training
    does; {s: float64 copy of the average, or None before it exists}."""
    theta = torch.empty(traj.shape[1], dtype=dtype)
    out = {}
    for s in (range(len(traj)) if steps is None else steps):
        theta.copy_(traj[s])
        avg.update(s, theta)
        a = avg.average()
        out[s] = None if a is None else a.double().clone()
    return out


def random_walk(seed=0, T=1001, P=67, drift=2e-3, step=0.02, first_step=True):
    """(T, P) float64: θ_0 random, then steps of N(drift_p, step²) per coordinate. With
    first_step=False θ_1 = θ_0 (no move before the first update)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(P, generator=g, dtype=torch.float64)
    mean = drift * torch.randn(P, generator=g, dtype=torch.float64)
    steps = step * torch.randn(T, P, generator=g, dtype=torch.float64) + mean
    if not first_step:
        steps[0] = 0
    return start + steps.cumsum(0)
