"""bench_kernels.py's check: on CPU (Triton's interpreter) it passes on the shipped kernels and
catches a kernel that leaves an element unwritten or computes the wrong thing."""


# conftest.py sets TRITON_INTERPRET=1: the Triton tests run the kernels in its interpreter

import pytest

# Triton has wheels for Linux only (requirements.txt installs it there); elsewhere the kernels do
# not exist and averaging.py's torch code, tested in test_averaging.py, is all that runs
pytest.importorskip("triton", reason="Triton is not installed (no wheels off Linux)")
import torch

from benchmarks import bench_kernels as bk
from wagpt import kernels
from wagpt.configurator import load_config
from wagpt.errors import ConfigError

SMALL = lambda block: (1, 7, block + 1)   # noqa: E731  (the 1M size is slow in the interpreter)


def cpu_config(*args):
    return load_config(bk.KernelBenchConfig, ["--device=cpu", "--time=False", *args])


def test_check_passes_and_reports_a_small_error(monkeypatch, tmp_path):
    monkeypatch.setattr(bk, "check_sizes", SMALL)
    out = tmp_path / "k.jsonl"
    result = bk.run(cpu_config(f"--bench_out={out}"))
    assert 0 < result["check_worst_rel_err"] < bk.TOL
    assert out.read_text().count("\n") == 1


def skip_last(fn):
    def broken(state, theta, *args):
        fn(state[:-1], theta[:-1], *[a[:-1] if torch.is_tensor(a) else a for a in args])
        return state
    return broken


@pytest.mark.parametrize("kernel", ["ema", "ouema"])
def test_check_catches_an_unwritten_element_or_a_wrong_formula(monkeypatch, kernel):
    ops = kernels.triton_ops()
    if kernel == "ema":   # the last element keeps its old value
        monkeypatch.setattr(ops, "ema_update_", skip_last(ops.ema_update_))
    else:                 # θ₀'s weight with the wrong sign
        real = ops.ouema_update_
        monkeypatch.setattr(ops, "ouema_update_",
                            lambda e, t, t0, a, beta: real(e, t, t0.neg(), a, beta))
    with pytest.raises(AssertionError, match=f"{kernel} kernel.*relative error"):
        bk.check(cpu_config(f"--kernels={kernel}"), lambda block: (block + 1,))


def test_bad_settings_are_rejected():
    with pytest.raises(ConfigError, match="kernels='ema,lawa'"):
        cpu_config("--kernels=ema,lawa")
    with pytest.raises(ConfigError, match="time=True needs a CUDA device"):
        load_config(bk.KernelBenchConfig, ["--device=cpu"])
