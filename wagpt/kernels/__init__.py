"""
Fused Triton kernels for the averaging updates, and the switch that decides when to use them.

averaging.py's five update rules (`ema_update_`, `bema_step_`, `dema_step_`, `ouema_update_`,
`running_mean_update_`) ask `use_triton(state)` first and, if true, call the function of the same
name and signature in `triton_ops()` (wagpt/kernels/averaging_triton.py); otherwise they run
their torch code, which is the CPU path and the reference the kernels are tested against.

Backends (`set_backend`, the `backend(...)` context manager, or the environment variable
AVERAGING_BACKEND read once at import):
  auto    the kernels for CUDA tensors when Triton is installed, torch otherwise (the default)
  torch   always the torch code
  triton  always the kernels; CPU tensors need Triton's interpreter (TRITON_INTERPRET=1), which
          is how the tests run the kernels on a machine without a GPU

This module imports without Triton and without CUDA: `import triton` is only attempted, and the
kernel module is imported at its first use, so a CPU-only install never pays for it.
"""

import os
from contextlib import contextmanager

try:
    import triton  # noqa: F401  (only to learn whether it is there; the kernels import it again)
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

BACKENDS = ("auto", "torch", "triton")


def _checked(name):
    if name not in BACKENDS:
        raise ValueError(f"averaging backend {name!r} is unknown; use one of "
                         f"{', '.join(repr(b) for b in BACKENDS)}")
    return name


_backend = _checked(os.environ.get("AVERAGING_BACKEND", "auto"))
_ops = None   # wagpt/kernels/averaging_triton.py once imported


def set_backend(name):
    global _backend
    _backend = _checked(name)


def get_backend():
    return _backend


@contextmanager
def backend(name):
    """`with kernels.backend("torch"): ...` runs the block on that backend, then restores."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_triton(tensor):
    """Whether the update of the state `tensor` runs as a Triton kernel under the current backend.
    Asking for "triton" where it cannot run is an error, not a silent fallback to torch."""
    if _backend == "torch":
        return False
    if _backend == "auto":
        return tensor.is_cuda and HAVE_TRITON
    if not HAVE_TRITON:
        raise RuntimeError("averaging backend 'triton' needs Triton: pip install triton "
                           "(or use backend 'auto' or 'torch')")
    if not tensor.is_cuda:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"averaging backend 'triton' got a tensor on {tensor.device}: Triton runs CPU "
                f"tensors only in its interpreter; set TRITON_INTERPRET=1 before starting Python "
                f"(Triton reads it when the kernels are defined, at their first use)")
        if _ops is not None and not _ops.INTERPRETED:
            raise RuntimeError("the averaging kernels were compiled for the GPU (TRITON_INTERPRET "
                               "was not 1 at their first use) and cannot take CPU tensors; set "
                               "TRITON_INTERPRET=1 before starting Python")
    return True


def triton_ops():
    """The kernel module, imported at the first call (Triton decides then, at @triton.jit time,
    whether the kernels are compiled for the GPU or run in its interpreter)."""
    global _ops
    if _ops is None:
        if not HAVE_TRITON:
            raise RuntimeError("the averaging kernels need Triton: pip install triton")
        from wagpt.kernels import averaging_triton
        _ops = averaging_triton
    return _ops
