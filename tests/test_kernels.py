"""The Triton kernels of wagpt/kernels/ run on CPU tensors in Triton's interpreter, checked against
float64 references written from the formulas (never by calling averaging.py's torch code), and the
backend switch that decides which of the two averaging.py runs.

Tolerances. Each kernel output is at most four fp32 operations on O(1) random values, plus the
rounding of β, α, a, 1/(1 − a), 1/n to fp32: every element is within a few units of 2^-24 ≈ 6e-8
relative of the exact value, so ‖out − ref‖/‖ref‖ stays below ~3e-7 (measured: at most 9e-8, for
OUEMA). The bar is 1e-6. Every bug these tests look for costs far more: one element left
unwritten adds ~1/sqrt(numel) ≥ 1e-2, a scalar passed in bf16 or θ rounded to bf16 on the way
~1e-3, a wrong formula O(1). With θ in bfloat16 the reference uses θ's bf16 values (upcasting is
exact), so the same bar applies.

Sizes straddle the block (1, 7, BLOCK ± 1, 3·BLOCK + 17), so the masked last block is exercised,
and every buffer the kernels write is a view into a larger buffer whose tail holds a sentinel: a
store past numel shows up there (the interpreter writes CPU memory through raw pointers, so it
would not crash). Outputs that are not read first (out) start as NaN.
"""

import os

# conftest.py sets TRITON_INTERPRET=1 before any kernel is decorated: these tests run the
# kernels in Triton's interpreter on CPU tensors
import subprocess
import sys
from pathlib import Path

import pytest

# Triton has wheels for Linux only (requirements.txt installs it there); elsewhere the kernels do
# not exist and averaging.py's torch code, tested in test_averaging.py, is all that runs
pytest.importorskip("triton", reason="Triton is not installed (no wheels off Linux)")
import torch

import averaging
from wagpt import kernels

OPS = kernels.triton_ops()
if not OPS.INTERPRETED:
    raise RuntimeError("wagpt/kernels/averaging_triton.py was imported before TRITON_INTERPRET=1 "
                       "was set (something called kernels.triton_ops() at import time), so its "
                       "kernels are compiled for a GPU and these CPU tests cannot run them")

REPO = Path(__file__).resolve().parent.parent
BLOCK = OPS.BLOCK
SIZES = (1, 7, BLOCK - 1, BLOCK + 1, 3 * BLOCK + 17)
THETA_DTYPES = (torch.float32, torch.bfloat16)
TOL = 1e-6
SENTINEL = 12345.0
TAIL = 64
UPDATES = ("ema_update_", "bema_step_", "dema_step_", "ouema_update_", "running_mean_update_")

params = pytest.mark.parametrize("n,theta_dtype", [(n, d) for n in SIZES for d in THETA_DTYPES])


def rand(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)


class Written:
    """A float32 buffer of n elements that a kernel writes: a view into n + TAIL elements whose
    tail holds SENTINEL, to catch stores past the end."""

    def __init__(self, init):
        self.full = torch.full((init.numel() + TAIL,), SENTINEL)
        self.full[:init.numel()] = init
        self.t = self.full[:init.numel()]

    def check(self, ref):
        got = self.t
        assert torch.equal(self.full[got.numel():], torch.full((TAIL,), SENTINEL)), \
            "a store went past the end of the buffer"
        assert torch.isfinite(got).all(), f"{(~torch.isfinite(got)).sum()} elements not written"
        err = ((got.double() - ref).norm() / ref.norm()).item()
        assert err < TOL, f"relative error {err:.3g} >= {TOL}"


def inputs(n, theta_dtype, *names):
    """θ (in theta_dtype) and float32 tensors for names, random and distinct, with their float64
    values (θ's as stored, i.e. after rounding to bf16)."""
    theta = rand(n, 0, theta_dtype)
    tensors = [rand(n, i + 1) for i in range(len(names))]
    return theta, theta.double(), tensors, [t.double() for t in tensors]


# ----------------------------------------------------------- kernels vs float64 references

@params
def test_ema_kernel(n, theta_dtype):
    theta, th, (e,), (e64,) = inputs(n, theta_dtype, "ema")
    beta = 0.37
    ema = Written(e)
    assert OPS.ema_update_(ema.t, theta, beta) is ema.t
    ema.check(e64 + beta * (th - e64))


@params
def test_bema_kernel(n, theta_dtype):
    theta, th, (e, th0), (e64, th0_64) = inputs(n, theta_dtype, "ema", "theta0")
    beta, alpha = 0.29, 0.63
    ema, out = Written(e), Written(torch.full((n,), float("nan")))
    assert OPS.bema_step_(ema.t, theta, th0, beta, alpha, out.t) is out.t
    e_new = e64 + beta * (th - e64)
    ema.check(e_new)
    out.check(e_new + alpha * (th - th0_64))


@params
@pytest.mark.parametrize("with_out", [True, False])
def test_dema_kernel(n, theta_dtype, with_out):
    theta, th, (a, b), (e1_64, e2_64) = inputs(n, theta_dtype, "e1", "e2")
    beta = 0.31
    e1, e2, out = Written(a), Written(b), Written(torch.full((n,), float("nan")))
    ret = OPS.dema_step_(e1.t, e2.t, theta, beta, out.t if with_out else None)
    e1_new = e1_64 + beta * (th - e1_64)
    e2_new = e2_64 + beta * (e1_new - e2_64)
    e1.check(e1_new)
    e2.check(e2_new)
    if with_out:
        assert ret is out.t
        out.check(2 * e1_new - e2_new)
    else:   # the torch version returns out, i.e. None, and the kernel never touched a buffer
        assert ret is None
        assert out.t.isnan().all()


@params
def test_ouema_kernel(n, theta_dtype):
    theta, th, (e, th0), (e64, th0_64) = inputs(n, theta_dtype, "ema", "theta0")
    a, beta = 2 ** -0.2, 0.41   # a_0 with the default lag 1 and bias_power 0.2: 1/(1 − a) ≈ 7.7
    ema = Written(e)
    assert OPS.ouema_update_(ema.t, theta, th0, a, beta) is ema.t
    tilde = (th - a * th0_64) / (1 - a)
    ema.check(e64 + beta * (tilde - e64))


@params
def test_running_mean_kernel(n, theta_dtype):
    theta, th, (m,), (m64,) = inputs(n, theta_dtype, "mean")
    mean = Written(m)
    assert OPS.running_mean_update_(mean.t, theta, 7) is mean.t
    mean.check(m64 + (th - m64) / 7)


def test_empty_buffers_are_a_no_op():
    e = torch.empty(0)
    assert OPS.ema_update_(e, torch.empty(0), 0.5) is e


# ------------------------------------------------------------------------- argument checks

N = 33


def bad_calls():
    f32, bf16 = torch.float32, torch.bfloat16
    ok = lambda dtype=f32: rand(N, 1, dtype)   # noqa: E731
    strided = rand(2 * N, 2)[::2]
    return [
        ("ema float64", lambda: OPS.ema_update_(ok(torch.float64), ok(), 0.5), "float32"),
        ("ema bf16", lambda: OPS.ema_update_(ok(bf16), ok(), 0.5), "float32"),
        ("theta float16", lambda: OPS.ema_update_(ok(), ok(torch.float16), 0.5), "bfloat16"),
        ("size mismatch", lambda: OPS.ema_update_(rand(N + 1, 1), ok(), 0.5), "elements"),
        ("non-contiguous state", lambda: OPS.ema_update_(strided, ok(), 0.5), "contiguous"),
        ("non-contiguous theta", lambda: OPS.ema_update_(ok(), strided, 0.5), "contiguous"),
        ("2-D", lambda: OPS.ema_update_(ok().view(3, 11), ok().view(3, 11), 0.5), "1-D"),
        ("device", lambda: OPS.ema_update_(torch.empty(N, device="meta"), ok(), 0.5), "meta"),
        ("not a tensor", lambda: OPS.ema_update_([1.0] * N, ok(), 0.5), "tensor"),
        ("bema out dtype", lambda: OPS.bema_step_(ok(), ok(), ok(), 0.5, 0.5, ok(bf16)), "out"),
        ("bema theta0 size",
         lambda: OPS.bema_step_(ok(), ok(), rand(N - 1, 1), 0.5, 0.5, ok()), "theta0"),
        ("dema out size", lambda: OPS.dema_step_(ok(), ok(), ok(), 0.5, rand(N + 1, 1)), "out"),
        ("nan beta", lambda: OPS.ema_update_(ok(), ok(), float("nan")), "beta"),
        ("tensor beta", lambda: OPS.ema_update_(ok(), ok(), torch.tensor(0.5)), "Python number"),
        ("ouema a = 1", lambda: OPS.ouema_update_(ok(), ok(), ok(), 1.0, 0.5), "a=1"),
        ("mean n = 0", lambda: OPS.running_mean_update_(ok(), ok(), 0), "n=0"),
    ]


@pytest.mark.parametrize("call,match", [c[1:] for c in bad_calls()],
                         ids=[c[0] for c in bad_calls()])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------ dispatcher

def test_backend_names_and_context_manager():
    assert kernels.get_backend() == os.environ.get("AVERAGING_BACKEND", "auto")
    with pytest.raises(ValueError, match="'auto', 'torch', 'triton'"):
        kernels.set_backend("cuda")
    with pytest.raises(ValueError, match="'gpu' is unknown"):
        with kernels.backend("gpu"):
            pass
    before = kernels.get_backend()
    with pytest.raises(KeyError):
        with kernels.backend("torch"):
            assert kernels.get_backend() == "torch"
            raise KeyError   # restored on the way out of an exception too
    assert kernels.get_backend() == before


def test_use_triton(monkeypatch):
    cpu = torch.zeros(3)
    cuda_like = type("CudaTensor", (), {"is_cuda": True})()   # "auto" only looks at is_cuda
    with kernels.backend("torch"):
        assert not kernels.use_triton(cpu) and not kernels.use_triton(cuda_like)
    with kernels.backend("auto"):
        assert not kernels.use_triton(cpu)
        assert kernels.use_triton(cuda_like)
        monkeypatch.setattr(kernels, "HAVE_TRITON", False)
        assert not kernels.use_triton(cuda_like)
    with kernels.backend("triton"):
        with pytest.raises(RuntimeError, match="pip install triton"):
            kernels.use_triton(cpu)
        monkeypatch.setattr(kernels, "HAVE_TRITON", True)
        assert kernels.use_triton(cpu)   # TRITON_INTERPRET=1, set at the top of this file
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before starting Python"):
            kernels.use_triton(cpu)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(OPS, "INTERPRETED", False)
        with pytest.raises(RuntimeError, match="compiled for the GPU"):
            kernels.use_triton(cpu)


def update_args(name, n=5):
    """Arguments for averaging.<name>, fresh each call."""
    t = lambda seed: rand(n, seed)   # noqa: E731
    return {"ema_update_": lambda: (t(1), t(2), 0.5),
            "bema_step_": lambda: (t(1), t(2), t(3), 0.5, 0.25, t(4)),
            "dema_step_": lambda: (t(1), t(2), t(3), 0.5, t(4)),
            "ouema_update_": lambda: (t(1), t(2), t(3), 0.5, 0.5),
            "running_mean_update_": lambda: (t(1), t(2), 3)}[name]()


@pytest.mark.parametrize("name", UPDATES)
def test_averaging_dispatches_to_the_kernel(name, monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args)
        return "from the kernel"

    monkeypatch.setattr(OPS, name, spy)
    fn = getattr(averaging, name)
    for b in ("torch", "auto"):   # auto on CPU tensors: torch
        with kernels.backend(b):
            assert isinstance(fn(*update_args(name)), torch.Tensor)
    assert calls == []
    args = update_args(name)
    with kernels.backend("triton"):
        assert fn(*args) == "from the kernel"
    assert len(calls) == 1 and all(x is y for x, y in zip(calls[0], args))


@pytest.mark.parametrize("name", UPDATES)
def test_averaging_functions_agree_across_backends(name):
    """The same call on both backends updates the same buffers to within fp32 rounding and
    returns the corresponding object (state, out or None)."""
    results = {}
    for b in ("torch", "triton"):
        args = update_args(name, n=BLOCK + 3)
        with kernels.backend(b):
            ret = getattr(averaging, name)(*args)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        results[b] = ([i for i, a in enumerate(args) if a is ret], tensors)
    assert results["torch"][0] == results["triton"][0]
    for x, y in zip(results["torch"][1], results["triton"][1]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def run_python(code, **env):
    env = {k: v for k, v in os.environ.items() if k not in ("AVERAGING_BACKEND",)} | env
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_imports_and_averages_without_triton():
    code = """
import sys
sys.modules["triton"] = None   # every `import triton` now raises ImportError, as if not installed
import torch, averaging
from wagpt import kernels
assert not kernels.HAVE_TRITON
assert kernels.get_backend() == "torch"   # from AVERAGING_BACKEND
kernels.set_backend("auto")
e = torch.zeros(5)
averaging.ema_update_(e, torch.ones(5), 0.25)
assert torch.equal(e, torch.full((5,), 0.25)), e
kernels.set_backend("triton")
try:
    averaging.ema_update_(e, torch.ones(5), 0.25)
except RuntimeError as err:
    assert "pip install triton" in str(err), err
else:
    raise AssertionError("backend 'triton' without Triton must raise")
print("ok")
"""
    r = run_python(code, AVERAGING_BACKEND="torch")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_invalid_backend_in_environment_fails_at_import():
    r = run_python("from wagpt import kernels", AVERAGING_BACKEND="gpu")
    assert r.returncode != 0
    assert "'gpu' is unknown; use one of 'auto', 'torch', 'triton'" in r.stderr


# --------------------------------------------------------------------------- end to end

def trajectory(T=25, P=BLOCK + 5, seed=0):
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(P, generator=g)
    return start + (0.05 * torch.randn(T, P, generator=g)).cumsum(0)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of each kernel function, which still run."""
    counts = dict.fromkeys(UPDATES, 0)
    for name in UPDATES:
        def counted(*args, _name=name, _fn=getattr(OPS, name)):
            counts[_name] += 1
            return _fn(*args)
        monkeypatch.setattr(OPS, name, counted)
    return counts


@pytest.mark.parametrize("method,hparams,kernel", [
    ("ema", dict(ema_decay=0.9, ema_update_after=2), "ema_update_"),
    ("bema", dict(bema_update_after=3, bema_update_freq=2), "bema_step_"),
    ("bema", dict(bema_bias_power=-1.0, bema_update_freq=1), "ema_update_"),
    ("dema", dict(dema_lag=2.0), "dema_step_"),
    ("ouema", dict(), "ouema_update_"),
    ("swa", dict(swa_start=4), "running_mean_update_"),
    ("wa", dict(wa_interval=2, wa_horizon=10, wa_windows=2), "running_mean_update_"),
])
@pytest.mark.parametrize("theta_dtype", THETA_DTYPES)
def test_averager_on_triton_matches_torch(method, hparams, kernel, theta_dtype, kernel_calls):
    traj = trajectory()
    averages = {}
    for b in ("torch", "triton"):
        avg = averaging.build_averager(method, **hparams)
        theta = torch.empty(traj.shape[1], dtype=theta_dtype)   # one tensor, mutated in place
        got = []
        with kernels.backend(b):
            for s in range(len(traj)):
                theta.copy_(traj[s])
                avg.update(s, theta)
                a = avg.average()
                got.append(None if a is None else a.clone())
        averages[b] = got
    assert kernel_calls[kernel] > 0 and sum(kernel_calls.values()) == kernel_calls[kernel]
    for s, (x, y) in enumerate(zip(averages["torch"], averages["triton"])):
        assert (x is None) == (y is None), f"step {s}"
        if x is not None:   # 25 contracting fp32 updates that may round differently: ~1e-7
            torch.testing.assert_close(y, x, rtol=0, atol=2e-6 * x.abs().max().item(),
                                       msg=f"step {s}")
