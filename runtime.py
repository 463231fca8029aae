"""
The process a command runs in: its device and precision, the process group under torchrun, the
few collectives the tools need, and the stop signals.

    runtime = init_runtime(device="auto", dtype="auto")   # joins the group under torchrun
    with runtime.autocast():
        loss = model(x, y)
    mean = all_reduce_mean(loss, runtime)
    teardown(runtime)

Every entry point (train.py, average.py, evaluate.py, sample.py) starts here, so "auto" means the
same everywhere: CUDA if available with bfloat16 autocast, else the CPU in float32.
"""

import os
import signal
import threading
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from configurator import ConfigError

DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    autocast_dtype: torch.dtype | None = None  # None: plain float32

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def check_dtype(dtype):
    """ConfigError unless `dtype` is a precision the tools support."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: use 'auto', 'float32' or 'bfloat16' (float16 "
                          f"would need loss scaling, which this trainer does not do)")
    return dtype


def init_runtime(device="auto", dtype="auto"):
    """Pick the device and precision; join the process group when launched by torchrun."""
    check_dtype(dtype)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device_name = device
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} but CUDA is not available; use --device=cpu")
        if world_size > 1:
            device_name = f"cuda:{local_rank}"
        elif device_name == "cuda":
            # an explicit index: set_device rejects a bare "cuda", and the flat buffers, the
            # averagers and the checkpoints compare devices, where cuda != cuda:0
            device_name = f"cuda:{torch.cuda.current_device()}"
        torch.cuda.set_device(device_name)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    torch_device = torch.device(device_name)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
    if dtype == "auto":
        dtype = ("bfloat16" if torch_device.type == "cuda" and torch.cuda.is_bf16_supported()
                 else "float32")
    autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
    return Runtime(torch_device, rank, local_rank, world_size, autocast_dtype)


def teardown(runtime):
    if runtime.ddp and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value, runtime):
    """Mean of a float over ranks (a host sync: only at log/eval time)."""
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=runtime.device)
    if runtime.ddp:
        dist.all_reduce(tensor)
        tensor /= runtime.world_size
    return tensor.item()


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits at a step boundary.
    A second SIGINT interrupts at once."""

    def __init__(self):
        self.requested = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def check(self, runtime):
        """Agreed over ranks, so every rank stops at the same step (a collective: call rarely)."""
        flag = 1.0 if self.requested else 0.0
        return all_reduce_mean(flag, runtime) > 0 if runtime.ddp else bool(flag)
