"""wagpt/posthoc.py against brute-force float64 references written from the definitions:
- the discrete weights by running the power-EMA recursion on unit vectors (EDM2's update,
  decay (1 − φ/t)^(γ+1) per acting step), never through posthoc's closed form;
- continuous inner products, widths and least squares by composite Gauss–Legendre quadrature
  with panel edges at every profile's end (so each panel's integrand is smooth);
- exact least squares by numpy.linalg.lstsq on the explicit weight matrix;
- end to end: reconstructions from stored averages of averaging.py's phema against the phema
  tracked directly.
Tolerances are a few orders above the float64 rounding measured for the quantity compared
(weights and inner products agree to ~1e-14, least-squares coefficients to ~1e-14 of the
largest); every formula error these tests look for (a swapped exponent, a time shift, a missing
normalisation) is 1e-3 or larger.
"""

import numpy as np
import pytest
import torch

from averaging import build_averager
from wagpt import posthoc
from wagpt.posthoc import (gamma_to_sigma_rel, gram_matrix, profile_inner_product, profile_weights,
                           reconstruction_error, sigma_rel_to_gamma, solve_coefficients, synthesize)

pytestmark = pytest.mark.usefixtures("one_thread")

G05, G10 = 16.97219860230345, 6.937203937601809   # EDM2's σ_rel 0.05 and 0.10 (np.roots)


# ------------------------------------------------------------------------------ references

def recursion_weights(n, gamma, phi=1):
    """Weights of θ at t = φ, 2φ, ..., nφ in the average at t = nφ, from the recursion itself:
    state initialised to the unit vector of θ_0, then at each acting t the decay
    (1 − φ/t)^(γ+1) on the old state. Returns (weight of θ_0, weights of the n iterates)."""
    e = np.zeros(n + 1)
    e[0] = 1.0
    for k in range(1, n + 1):
        decay = (1 - phi / (k * phi)) ** (gamma + 1)
        theta = np.zeros(n + 1)
        theta[k] = 1.0
        e = decay * e + (1 - decay) * theta
    return e[0], e[1:]


def weight_matrix(profiles, phi=1):
    """Rows: the recursion's weights of each profile (t, γ), zero-padded to the longest."""
    n_max = max(t // phi for t, _ in profiles)
    rows = np.zeros((len(profiles), n_max))
    for i, (t, gamma) in enumerate(profiles):
        rows[i, :t // phi] = recursion_weights(t // phi, gamma, phi)[1]
    return rows


def quadrature(breaks, panels=200, order=12):
    """Nodes and weights of composite Gauss–Legendre over [0, max(breaks)], with panel edges at
    every break point."""
    x, w = np.polynomial.legendre.leggauss(order)
    edges = np.unique(np.concatenate([np.linspace(0, b, panels + 1) for b in breaks]))
    mid, half = (edges[:-1] + edges[1:]) / 2, (edges[1:] - edges[:-1]) / 2
    return (mid[:, None] + half[:, None] * x).ravel(), (half[:, None] * w).ravel()


def profile(x, t, gamma):
    """p(x) = (γ+1) x^γ / t^(γ+1) on [0, t], 0 after."""
    return np.where(x <= t, (gamma + 1) * x ** gamma / t ** (gamma + 1), 0.0)


STORED = [(t, g) for t in (12, 30, 45, 60) for g in (G05, G10)]


# ------------------------------------------------------------------------------ σ_rel ↔ γ

def test_sigma_rel_and_gamma_convert_both_ways():
    for sigma_rel in (0.01, 0.05, 0.1, 0.2, 0.28):   # EDM2's recipe: the cubic's largest root
        q = sigma_rel ** -2
        edm2 = np.roots([1.0, 7.0, 16.0 - q, 12.0 - q]).real.max()
        assert sigma_rel_to_gamma(sigma_rel) == pytest.approx(edm2, rel=1e-10)
    assert round(sigma_rel_to_gamma(0.05), 2) == 16.97   # the values quoted in the paper
    assert round(sigma_rel_to_gamma(0.10), 2) == 6.94
    for gamma in (0.0, 0.5, 1.0, G10, G05, 100.0, 1e4):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9,
                                                                              abs=1e-12)
    assert gamma_to_sigma_rel(0.0) == posthoc.SIGMA_REL_MAX == pytest.approx(12 ** -0.5)
    for bad in (0.0, -0.1, 0.29):
        with pytest.raises(ValueError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.5, G10, G05])
def test_sigma_rel_is_the_profiles_std_over_t(gamma):
    """σ_rel = std of the profile over [0, t] / t (any t), by quadrature; the discrete weights
    of the recursion have the same width up to O(1/(σ_rel·n)²) (binning shrinks a variance by
    about one bin²/12)."""
    t = 3.7
    x, q = quadrature([t])
    p = profile(x, t, gamma)
    assert (q * p).sum() == pytest.approx(1, abs=1e-12)
    mean = (q * p * x).sum()
    std = np.sqrt((q * p * (x - mean) ** 2).sum())
    assert std / t == pytest.approx(gamma_to_sigma_rel(gamma), rel=1e-10)
    sigma = gamma_to_sigma_rel(gamma)
    gaps = []
    for n in (100, 1000):
        w = recursion_weights(n, gamma)[1]
        j = np.arange(1, n + 1)
        m = (w * j).sum()
        gaps.append(abs(np.sqrt((w * (j - m) ** 2).sum()) / n / sigma - 1))
        assert gaps[-1] < 1 / (12 * (sigma * n) ** 2)
    assert gaps[1] < gaps[0] / 50 or gaps[1] < 1e-12


# ----------------------------------------------------------------------------- profiles

@pytest.mark.parametrize("n,gamma,phi", [(1, 3.0, 1), (7, 0.0, 1), (50, G05, 1), (200, G10, 4),
                                         (300, 0.7, 3), (40, 150.0, 2)])
def test_profile_weights_are_the_recursions(n, gamma, phi):
    w0, ref = recursion_weights(n, gamma, phi)
    got = profile_weights(n * phi, gamma, update_freq=phi)
    assert w0 == 0   # the initial copy is gone after the first update
    np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-300)
    assert got.sum() == pytest.approx(1, abs=1e-13)
    np.testing.assert_array_equal(got, profile_weights(n, gamma))   # only n = t/φ matters


@pytest.mark.parametrize("t_a,g_a,t_b,g_b", [(10.0, G05, 10.0, G10), (3.0, 0.0, 7.5, 2.5),
                                             (7.5, 2.5, 3.0, 0.0), (40.0, G10, 55.0, G05),
                                             (1.0, 1.0, 1000.0, 4.0)])
def test_continuous_inner_product_is_the_integral(t_a, g_a, t_b, g_b):
    x, q = quadrature([t_a, t_b])
    brute = (q * profile(x, t_a, g_a) * profile(x, t_b, g_b)).sum()
    assert profile_inner_product(t_a, g_a, t_b, g_b) == pytest.approx(brute, rel=1e-12)


@pytest.mark.parametrize("phi", [1, 3])
def test_exact_gram_is_the_sum_over_the_weights(phi):
    """Repeated ends, three distinct γ and a steep profile (γ = 150, weights far below 1e-100
    early on) against W·Wᵀ of the recursion's weights."""
    profiles = [(t * phi, g) for t, g in [(5, G05), (5, G10), (17, 0.0), (17, G05), (60, 150.0),
                                          (60, G10), (61, G10), (1, 2.0)]]
    w = weight_matrix(profiles, phi)
    np.testing.assert_allclose(gram_matrix(profiles, exact=True, update_freq=phi), w @ w.T,
                               rtol=1e-11, atol=1e-300)


def test_continuous_gram():
    g = gram_matrix(STORED, exact=False)
    for i, (ta, ga) in enumerate(STORED):
        for k, (tb, gb) in enumerate(STORED):
            assert g[i, k] == profile_inner_product(ta, ga, tb, gb)


# -------------------------------------------------------------------------- least squares

@pytest.mark.parametrize("sigma_r", [0.02, 0.075, 0.2])
def test_exact_solve_is_least_squares_over_the_weights(sigma_r):
    target = (60, sigma_rel_to_gamma(sigma_r))
    w = weight_matrix(STORED + [target])
    c = np.linalg.lstsq(w[:-1].T, w[-1], rcond=None)[0]
    c /= c.sum()   # EDM2's rescaling
    got = solve_coefficients(STORED, target)
    np.testing.assert_allclose(got, c, rtol=1e-10, atol=1e-12 * np.abs(c).max())
    assert got.sum() == pytest.approx(1, abs=1e-12)
    err = np.linalg.norm(c @ w[:-1] - w[-1]) / np.linalg.norm(w[-1])
    assert reconstruction_error(STORED, target, got) == pytest.approx(err, rel=1e-9)


@pytest.mark.parametrize("sigma_r", [0.02, 0.075, 0.2])
def test_continuous_solve_is_least_squares_over_the_profiles(sigma_r):
    target = (60.0, sigma_rel_to_gamma(sigma_r))
    x, q = quadrature([t for t, _ in STORED])
    rows = np.array([profile(x, t, g) for t, g in STORED + [target]]) * np.sqrt(q)
    c = np.linalg.lstsq(rows[:-1].T, rows[-1], rcond=None)[0]
    c /= c.sum()
    got = solve_coefficients(STORED, target, exact=False)
    np.testing.assert_allclose(got, c, rtol=1e-10, atol=1e-12 * np.abs(c).max())
    err = np.linalg.norm(c @ rows[:-1] - rows[-1]) / np.linalg.norm(rows[-1])
    assert reconstruction_error(STORED, target, got, exact=False) == pytest.approx(err,
                                                                                  rel=1e-9)


def test_a_stored_profile_is_reconstructed_as_itself():
    for exact in (True, False):
        c = solve_coefficients(STORED, (60, G10), exact=exact)
        expect = np.array([1.0 if p == (60, G10) else 0.0 for p in STORED])
        np.testing.assert_allclose(c, expect, atol=1e-8)
        assert reconstruction_error(STORED, (60, G10), c, exact=exact) < 1e-7


def test_continuous_and_exact_fits_differ_for_narrow_profiles_only():
    """The finding of docs/averaging.md (continuous vs exact). Updated every step, stored every 2
    steps up to t = 20 (σ_rel 0.05 is then 1 step wide): 20 profiles span the 20 iterates, so
    the exact fit is exact, while the continuous one misses by 10%. Stored every 500 steps up
    to 5000: both fits agree to ~1e-5."""
    narrow = [(t, g) for t in range(2, 21, 2) for g in (G05, G10)]
    target = (20, sigma_rel_to_gamma(0.02))
    exact = solve_coefficients(narrow, target)
    continuous = solve_coefficients(narrow, target, exact=False)
    assert reconstruction_error(narrow, target, exact) < 1e-6
    assert reconstruction_error(narrow, target, continuous) > 0.05
    wide = [(t, g) for t in range(500, 5001, 500) for g in (G05, G10)]
    for sigma_r in (0.02, 0.2):
        target = (5000, sigma_rel_to_gamma(sigma_r))
        exact = solve_coefficients(wide, target)
        continuous = solve_coefficients(wide, target, exact=False)
        assert np.abs(exact - continuous).max() < 1e-3
        e_exact = reconstruction_error(wide, target, exact)
        assert e_exact == pytest.approx(reconstruction_error(wide, target, continuous), rel=1e-3)
        assert e_exact > 1e-3   # ten snapshots do not pin either target down


# ------------------------------------------------------------------------------ end to end

def tracked(hparams, traj, store_every, tau):
    """Run a phema over the trajectory; its averages at the steps s = τ + k·store_every."""
    avg = build_averager("phema", **hparams)
    theta = torch.empty(traj.shape[1])
    stored = {}
    for s in range(len(traj)):
        theta.copy_(traj[s])
        avg.update(s, theta)
        if s > tau and (s - tau) % store_every == 0:
            stored[s - tau] = avg.average().double().clone()
    return stored


@pytest.mark.parametrize("store_every,t_r,dense", [(2, 40, True), (10, 200, False)])
def test_reconstruction_from_stored_phemas(store_every, t_r, dense):
    """Two phemas of averaging.py (σ_rel 0.05, 0.10, period 2, burn-in 3) stored every
    `store_every` steps; the synthesis for σ_rel 0.02 and 0.2 at t_r is Σ_j (Σ_i c_i w_i,j) θ_j
    with the recursion's weights (up to float32). Dense storage spans every iterate, so it also
    equals the phema of that width tracked directly; sparse storage does not."""
    tau, phi = 3, 2
    g = torch.Generator().manual_seed(5)
    traj = (torch.randn(1, 40, generator=g, dtype=torch.float64)
            + 0.05 * torch.randn(tau + t_r + 1, 40, generator=g, dtype=torch.float64).cumsum(0))
    iterates = traj[tau + phi::phi].numpy()   # θ at t = φ, 2φ, ..., t_r
    common = dict(phema_update_after=tau, phema_update_freq=phi)
    stores = {sr: tracked(dict(phema_sigma_rel=sr, **common), traj, store_every, tau)
              for sr in (0.05, 0.10)}
    stored = [(t, sigma_rel_to_gamma(sr)) for t in sorted(stores[0.05]) for sr in (0.05, 0.10)]
    tensors = [stores[sr][t] for t in sorted(stores[0.05]) for sr in (0.05, 0.10)]
    for sigma_r in (0.02, 0.2):
        target = (t_r, sigma_rel_to_gamma(sigma_r))
        c = solve_coefficients(stored, target, update_freq=phi)
        got = synthesize(c, tensors).double().numpy()
        predicted = c @ weight_matrix(stored, phi) @ iterates
        assert np.abs(got - predicted).max() < 2e-6
        direct = tracked(dict(phema_sigma_rel=sigma_r, **common), traj, t_r, tau)[t_r].numpy()
        err = reconstruction_error(stored, target, c, update_freq=phi)
        if dense:
            assert err < 1e-6 and np.abs(got - direct).max() < 2e-6
        else:
            assert err > 1e-3 and np.abs(got - direct).max() > 1e-4


# ------------------------------------------------------------------------------ synthesis

def test_synthesize_is_the_float64_combination():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(1000, generator=g) for _ in range(5)]
    c = np.array([40.0, -39.5, 0.25, 0.5, -0.25])   # cancelling coefficients
    ref = sum(ci * x.double() for ci, x in zip(c, xs))
    got = synthesize(c, (x for x in xs))   # a generator: read one at a time
    assert got.dtype == torch.float32
    assert torch.equal(got, ref.float())
    two = synthesize(np.stack([c, np.ones(5) / 5], axis=1), xs)
    assert two.shape == (2, 1000) and torch.equal(two[0], got)
    assert torch.equal(two[1], sum(0.2 * x.double() for x in xs).float())


@pytest.mark.parametrize("coeffs,tensors,match", [
    ([0.5, 0.5], [torch.zeros(3)], "1 tensors for 2 coefficients"),
    ([1.0], [torch.zeros(3), torch.zeros(3)], "more tensors than the 1"),
    ([0.5, 0.5], [torch.zeros(3), torch.zeros(4)], "tensor 1 has 4 entries"),
    ([1.0], [torch.zeros(2, 2)], "flat"),
    ([], [], "shape"),
])
def test_synthesize_rejects_mismatches(coeffs, tensors, match):
    with pytest.raises(ValueError, match=match):
        synthesize(coeffs, tensors)


@pytest.mark.parametrize("stored,target,kw,match", [
    ([], (10, 1.0), {}, "stored is empty"),
    ([(20, 1.0)], (10, 1.0), {}, "after the target"),
    ([(10, 1.0)], (10, -1.0), {}, "gamma=-1.0"),
    ([(0, 1.0)], (10, 1.0), {}, "t=0"),
    ([(5, 1.0)], (10, 1.0), dict(update_freq=2), "t=5: must be a positive multiple"),
    ([(4, 1.0)], (10, 1.0), dict(update_freq=0), "update_freq=0"),
])
def test_bad_inputs_name_the_culprit(stored, target, kw, match):
    with pytest.raises(ValueError, match=match):
        solve_coefficients(stored, target, **kw)


# ------------------------------------------------------------- streamed reconstruction

def stored_files(store_every=3, steps=30, tau=2, phi=1, numel=50):
    """Stored phemas (σ_rel 0.05, 0.1) of a random walk every `store_every` steps, as the
    Reconstruction sees a run's posthoc files: [(key, step, [(name, t, γ)])] and the tensors."""
    g = torch.Generator().manual_seed(9)
    traj = torch.randn(numel, generator=g) + 0.05 * torch.randn(steps + 1, numel,
                                                                generator=g).cumsum(0)
    averagers = {name: build_averager("phema", phema_sigma_rel=sr, phema_update_after=tau,
                                      phema_update_freq=phi)
                 for name, sr in (("a", 0.05), ("b", 0.1))}
    files, tensors = [], {}
    for s in range(steps + 1):
        for averager in averagers.values():
            averager.update(s, traj[s].clone())
        if s > tau and s % store_every == 0:
            files.append((s, s, [(n, a.step - tau, a.gamma) for n, a in averagers.items()]))
            tensors[s] = {n: a.average().clone() for n, a in averagers.items()}
    return files, tensors


@pytest.mark.parametrize("phi", [1, 2])
def test_streamed_reconstruction_is_synthesize_of_the_solved_coefficients(phi):
    """wagpt.posthoc.Reconstruction (average.py's) at each evaluation step equals, bit for bit,
    synthesize over the files stored up to it with solve_coefficients' coefficients, whatever
    the window of steps accumulated at once; steps before the first stored profile have
    none, and neither have steps no stored profile reaches (posthoc.coverage: they could only
    be averages of older profiles); each file is read once per window."""
    tau = 2
    files, tensors = stored_files(tau=tau, phi=phi)
    targets = {"x": sigma_rel_to_gamma(0.03), "y": sigma_rel_to_gamma(0.2)}
    steps = [2, 4, 9, 15, 16, 30]   # step 2 = τ: nothing to reconstruct
    results = {}
    for window in (1, 2, None):
        reads = []

        def read(key):
            reads.append(key)
            return tensors[key]
        rec = posthoc.Reconstruction(files, targets, steps, tau, phi, read, window=window)
        results[window] = {s: rec.at(s) for s in steps}
        if window is None:   # one window: every file read once, in order
            assert reads == [key for key, _, _ in files]
    assert results[1][2] == {}
    covered, uncovered = posthoc.coverage(files, steps, tau, phi)
    assert covered and uncovered   # steps 4 and 16 fall between stored files
    for s in steps[1:]:
        t_r = (s - tau) // phi * phi
        used = [(key, name, t, g) for key, step, profiles in files if step <= s
                for name, t, g in profiles if t > 0]   # t = 0: still the copy of θ_τ
        stored = [(t, g) for _, _, t, g in used]
        flat = [tensors[key][name] for key, name, _, _ in used]
        if not stored:   # no profile has averaged anything yet
            assert results[None][s] == {}
            continue
        if s in uncovered:   # the stored profiles end before t_r: no stale average
            assert max(t for t, _ in stored) < t_r
            assert all(results[window][s] == {} for window in (1, 2, None))
            continue
        assert max(t for t, _ in stored) == t_r
        for label, gamma in targets.items():
            c = solve_coefficients(stored, (t_r, gamma), update_freq=phi)
            expected = synthesize(c, flat)
            for window in (1, 2, None):
                assert torch.equal(results[window][s][label], expected), (s, label, window)
        rec_errors = posthoc.Reconstruction(files, targets, [s], tau, phi, None).errors[s]
        assert rec_errors["x"] == pytest.approx(reconstruction_error(
            stored, (t_r, targets["x"]), solve_coefficients(stored, (t_r, targets["x"]),
                                                            update_freq=phi), update_freq=phi))


def test_a_stored_width_is_reconstructed_as_the_stored_average():
    files, tensors = stored_files()
    rec = posthoc.Reconstruction(files, {"a": files[-1][2][0][2]}, [files[-1][1]], 2, 1,
                                 lambda key: tensors[key])
    got = rec.at(files[-1][1])["a"]
    stored = tensors[files[-1][0]]["a"]
    assert rec.errors[files[-1][1]]["a"] < 1e-7
    torch.testing.assert_close(got, stored, rtol=0, atol=2e-6)
