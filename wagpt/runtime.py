"""
The process a command runs in: its device and precision, the process group under torchrun, the
few collectives the tools need, and the stop signals.

    with init_runtime(device="auto", dtype="auto") as runtime:   # joins the group under torchrun
        with runtime.autocast():
            loss = model(x, y)
        mean = all_reduce_mean(loss, runtime)
    # the process group is torn down here

Every entry point (train.py, average.py, eval_ckpt.py, sample.py) starts here, so "auto" means the
same everywhere: CUDA if available with bfloat16 autocast, else the CPU in float32.
"""

import os
import re
import signal
import threading
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from wagpt.configurator import one_line
from wagpt.errors import ConfigError, UserError

DTYPES = ("auto", "float32", "bfloat16")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    autocast_dtype: torch.dtype | None = None  # None: plain float32
    control_group: object = None  # a CPU (gloo) process group for host-side flags under DDP

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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        teardown(self)


def check_dtype(dtype):
    """ConfigError unless `dtype` is a precision the tools support."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: use 'auto', 'float32' or 'bfloat16' (float16 "
                          f"would need loss scaling, which this trainer does not do)")
    return dtype


def check_device(device):
    """ConfigError unless `device` names a device kind the tools know (whether it is present is
    checked when the runtime starts)."""
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ConfigError(f"device={device!r} is unknown; use 'auto', 'cpu', 'cuda', 'cuda:N' "
                          f"or 'mps'")
    return device


def init_runtime(device="auto", dtype="auto"):
    """Pick the device and precision; join the process group when launched by torchrun."""
    check_dtype(dtype)
    check_device(device)
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
    elif device_name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device!r} but this PyTorch has no usable MPS device (Apple "
                          f"GPUs only); use --device=cpu")
    torch_device = torch.device(device_name)
    control_group = None
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
        # host-side flags (the stop signal) travel on a CPU group: reading them never waits
        # for the GPU's queue of work
        control_group = (dist.new_group(backend="gloo") if dist.get_backend() != "gloo"
                         else dist.group.WORLD)
    if dtype == "auto":
        dtype = ("bfloat16" if torch_device.type == "cuda" and torch.cuda.is_bf16_supported()
                 else "float32")
    autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
    return Runtime(torch_device, rank, local_rank, world_size, autocast_dtype, control_group)


def teardown(runtime):
    if runtime.ddp and dist.is_initialized():
        dist.destroy_process_group()


def agree(runtime, check):
    """check() on every rank; when it raises a UserError on any, every rank raises (rank 0 with
    the first failing rank's message), so that no rank waits for another at a collective."""
    error = None
    try:
        result = check()
    except UserError as e:
        error, result = e, None
    if runtime.ddp:
        messages = [None] * runtime.world_size
        dist.all_gather_object(messages, None if error is None else one_line(error),
                               group=runtime.control_group)
        failed = [m for m in messages if m]
        if failed and error is None:
            error = ConfigError(failed[0])
    if error is not None:
        raise error
    return result


def all_reduce_mean(value, runtime):
    """Mean of a float over ranks (a host sync: only at log/eval time)."""
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=runtime.device)
    if runtime.ddp:
        dist.all_reduce(tensor)
        tensor /= runtime.world_size
    return tensor.item()


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits at a step boundary.
    A second SIGINT interrupts at once.

    `poll()` once per step says whether to stop now. Alone, it reads the flag. Under DDP every
    rank must stop at the same step, so the flags are combined with an all-reduce (max) over the
    CPU control group, started asynchronously at one step and read at the next: a signal that
    reaches any rank during step s stops every rank after step s + 1, whatever log_interval is,
    with no extra host synchronisation in the step (the reduce of 8 bytes has a whole step to
    finish, and it never waits for the GPU)."""

    def __init__(self, runtime=None):
        self.runtime = runtime
        self.requested = None
        self._previous = {}
        self._pending = None   # (work, flag tensor) of the all-reduce started at the last poll

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
        if self._pending is not None and exc[0] is None:
            self._pending[0].wait()   # every rank started it: finish it before the group goes
        self._pending = None

    def poll(self):
        """Whether every rank should stop after this step (call it at every step, on every
        rank)."""
        runtime = self.runtime
        if runtime is None or not runtime.ddp:
            return self.requested is not None
        stop = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            stop = flag.item() > 0   # a CPU tensor: no device synchronisation
        flag = torch.tensor([1.0 if self.requested else 0.0])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=runtime.control_group,
                               async_op=True)
        self._pending = (work, flag)
        return stop
