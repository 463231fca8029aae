"""
Triton kernels for averaging.py's update rules: the same functions, names and signatures, each
one pass over flat buffers. Imported lazily by wagpt.kernels.triton_ops(); averaging.py
dispatches to it.

An averaging update is pure memory traffic (a few flops per element), so what a kernel can win is
bytes: the torch BEMA step reads θ twice and makes a temporary, the fused one reads θ, θ₀ and e
once and writes e and the output (20 B per fp32 parameter, the cost model of docs/averaging.md).

Conventions, shared by every kernel:
- state and outputs are float32, 1-D, contiguous, all of one numel and device; θ is float32 or
  bfloat16 and is upcast in registers (no fp32 copy of θ in memory);
- scalars are Python numbers, passed as fp32 like torch passes a lerp weight to its fp32 kernel;
  reciprocals (1/n, 1/(1 − a)) are taken on the host in double, so the kernel only multiplies;
- offsets are int64, so buffers of 2^31 elements or more index correctly, and the last block is
  masked, so any numel works;
- the grid is cdiv(numel, BLOCK) programs of BLOCK elements; each element is read before it is
  written by the same program, so even an output aliasing an input is computed correctly.
"""

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Elements per program and warps per program: 2048 / (8 warps · 32 threads) = 8 fp32 per thread,
# two 16-byte loads per buffer. On an H100 every kernel runs at the copy rate with these, and the
# fused BEMA kernel is within noise of it at BLOCK 512-8192 x 4-16 warps (bench_kernels.py,
# docs/benchmarks.md); nothing else depends on the values.
BLOCK = 2048
NUM_WARPS = 8


# ---------------------------------------------------------------------------------- kernels

@triton.jit
def _offsets(n, BLOCK: tl.constexpr):
    # int64 before the multiply: pid * BLOCK overflows int32 past 2^31 elements
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def _lerp_kernel(state_ptr, theta_ptr, weight, n, BLOCK: tl.constexpr):
    """state ← state + w·(θ − state): EMA with w = β, running mean with w = 1/n."""
    offs, mask = _offsets(n, BLOCK)
    e = tl.load(state_ptr + offs, mask=mask)
    theta = tl.load(theta_ptr + offs, mask=mask).to(tl.float32)
    tl.store(state_ptr + offs, e + weight * (theta - e), mask=mask)


@triton.jit
def _bema_kernel(ema_ptr, theta_ptr, theta0_ptr, out_ptr, beta, alpha, n,
                 BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    e = tl.load(ema_ptr + offs, mask=mask)
    theta = tl.load(theta_ptr + offs, mask=mask).to(tl.float32)
    theta0 = tl.load(theta0_ptr + offs, mask=mask)
    e = e + beta * (theta - e)
    tl.store(ema_ptr + offs, e, mask=mask)
    tl.store(out_ptr + offs, e + alpha * (theta - theta0), mask=mask)


@triton.jit
def _dema_kernel(e1_ptr, e2_ptr, theta_ptr, out_ptr, beta, n,
                 BLOCK: tl.constexpr, HAS_OUT: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    e1 = tl.load(e1_ptr + offs, mask=mask)
    e2 = tl.load(e2_ptr + offs, mask=mask)
    theta = tl.load(theta_ptr + offs, mask=mask).to(tl.float32)
    e1 = e1 + beta * (theta - e1)
    e2 = e2 + beta * (e1 - e2)   # the second EMA follows the NEW e1, as in the torch code
    tl.store(e1_ptr + offs, e1, mask=mask)
    tl.store(e2_ptr + offs, e2, mask=mask)
    if HAS_OUT:   # a constexpr: without out the store is compiled away, not branched around
        tl.store(out_ptr + offs, 2.0 * e1 - e2, mask=mask)


@triton.jit
def _ouema_kernel(ema_ptr, theta_ptr, theta0_ptr, a, inv_one_minus_a, beta, n,
                  BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    e = tl.load(ema_ptr + offs, mask=mask)
    theta = tl.load(theta_ptr + offs, mask=mask).to(tl.float32)
    theta0 = tl.load(theta0_ptr + offs, mask=mask)
    tilde = (theta - a * theta0) * inv_one_minus_a
    tl.store(ema_ptr + offs, e + beta * (tilde - e), mask=mask)


# Whether Triton's interpreter runs these kernels (TRITON_INTERPRET=1 when they were decorated
# above): then they take CPU tensors and cannot take the GPU path, and kernels.use_triton says so.
INTERPRETED = isinstance(_lerp_kernel, InterpretedFunction)


# ----------------------------------------------------------------------- checks and launching

def _check(fn, theta, **state):
    """ValueError unless θ is flat fp32/bf16 and every state tensor flat fp32, all contiguous and
    of θ's numel and device: the kernels index raw pointers, so a mismatch would not be caught."""
    for name, t in (("theta", theta), *state.items()):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
        dtypes = (torch.float32, torch.bfloat16) if name == "theta" else (torch.float32,)
        if t.dtype not in dtypes:
            raise ValueError(f"{fn}: {name} must be {' or '.join(map(str, dtypes))}, got "
                             f"{t.dtype} (averaging state is float32 whatever the model's dtype)")
        if t.dim() != 1:
            raise ValueError(f"{fn}: {name} must be 1-D (a flat buffer), got shape "
                             f"{tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous (stride {t.stride()}); the kernel "
                             f"indexes its memory directly")
        if t.numel() != theta.numel():
            raise ValueError(f"{fn}: {name} has {t.numel()} elements, theta {theta.numel()}")
        if t.device != theta.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, theta on {theta.device}")


def _scalar(fn, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{fn}: {name}={value!r} must be a finite Python number")
    return float(value)


def _launch(kernel, theta, *args, **constexprs):
    n = theta.numel()
    if n == 0:
        return   # nothing to update: skip the launch and its overhead
    grid = (triton.cdiv(n, BLOCK),)
    if theta.is_cuda:
        # Triton launches on the current device; the buffers may live on another one
        with torch.cuda.device(theta.device):
            kernel[grid](*args, n, BLOCK=BLOCK, num_warps=NUM_WARPS, **constexprs)
    else:   # CPU tensors: the interpreter, which has no devices
        kernel[grid](*args, n, BLOCK=BLOCK, **constexprs)


# ------------------------------------------------------ the update rules (averaging.py's API)

def ema_update_(ema, theta, beta):
    """ema ← ema + β·(θ − ema). Returns ema."""
    _check("ema_update_", theta, ema=ema)
    _launch(_lerp_kernel, theta, ema, theta, _scalar("ema_update_", "beta", beta))
    return ema


def bema_step_(ema, theta, theta0, beta, alpha, out):
    """ema ← ema + β·(θ − ema); out ← ema_new + α·(θ − θ₀), in one pass. Returns out."""
    _check("bema_step_", theta, ema=ema, theta0=theta0, out=out)
    _launch(_bema_kernel, theta, ema, theta, theta0, out, _scalar("bema_step_", "beta", beta),
            _scalar("bema_step_", "alpha", alpha))
    return out


def dema_step_(e1, e2, theta, beta, out=None):
    """e1 ← lerp(e1, θ, β); e2 ← lerp(e2, e1_new, β); out ← 2·e1 − e2 if out is given, in one
    pass. Returns out (None without it), as the torch version does."""
    if out is None:
        _check("dema_step_", theta, e1=e1, e2=e2)
    else:
        _check("dema_step_", theta, e1=e1, e2=e2, out=out)
    # without out the kernel never touches out_ptr; e1 fills the slot
    _launch(_dema_kernel, theta, e1, e2, theta, e1 if out is None else out,
            _scalar("dema_step_", "beta", beta), HAS_OUT=out is not None)
    return out


def ouema_update_(ema, theta, theta0, a, beta):
    """ema ← lerp(ema, θ̃, β) with θ̃ = (θ − a·θ₀)/(1 − a). Returns ema."""
    _check("ouema_update_", theta, ema=ema, theta0=theta0)
    a = _scalar("ouema_update_", "a", a)
    if a == 1.0:
        raise ValueError("ouema_update_: a=1 divides by 1 - a = 0; a_t = b_t^(-eta) < 1 "
                         "needs b_t > 1 and eta > 0")
    _launch(_ouema_kernel, theta, ema, theta, theta0, a, 1.0 / (1.0 - a),
            _scalar("ouema_update_", "beta", beta))
    return ema


def running_mean_update_(mean, theta, n):
    """mean ← mean + (θ − mean)/n. Returns mean."""
    _check("running_mean_update_", theta, mean=mean)
    n = _scalar("running_mean_update_", "n", n)
    if n < 1:
        raise ValueError(f"running_mean_update_: n={n:g} must be >= 1 (the number of samples "
                         f"in the mean, this one included)")
    _launch(_lerp_kernel, theta, mean, theta, 1.0 / n)
    return mean
