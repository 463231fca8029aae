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

import datetime
import os
import re
import signal
import socket
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
    local_world_size: int = 1     # processes on this host (torchrun's LOCAL_WORLD_SIZE): they
                                  # share its memory

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


def init_runtime(device="auto", dtype="auto", timeout=None):
    """Pick the device and precision; join the process group when launched by torchrun.
    `timeout`: seconds a collective waits for the other ranks before it fails (None: torch's
    default, 30 min for gloo, 10 min for NCCL)."""
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
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32: fp32 matmuls left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    elif device_name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device!r} but this PyTorch has no usable MPS device (Apple "
                          f"GPUs only); use --device=cpu")
    torch_device = torch.device(device_name)
    control_group = None
    if world_size > 1:
        wait = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo",
                                    **wait)
        # host-side flags (the stop signal) travel on a CPU group: reading them never waits
        # for the GPU's queue of work
        control_group = (dist.new_group(backend="gloo", **wait) if dist.get_backend() != "gloo"
                         else dist.group.WORLD)
    if dtype == "auto":
        dtype = ("bfloat16" if torch_device.type == "cuda" and torch.cuda.is_bf16_supported()
                 else "float32")
    autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if world_size > 1 else 1
    return Runtime(torch_device, rank, local_rank, world_size, autocast_dtype, control_group,
                   local_world_size)


def teardown(runtime):
    if runtime.ddp and dist.is_initialized():
        dist.destroy_process_group()


SAME_FILES = "every node must see the same files at the same paths"


def agree(runtime, check, hint=""):
    """check() on every rank; when it raises a UserError on any, every rank raises, so that no
    rank waits for another at a collective. When some ranks failed and others did not (on several
    nodes: a file one node cannot see), the message is the first failing rank's, naming that rank
    and its host, one that did not fail, and `hint` (e.g. SAME_FILES)."""
    error = None
    try:
        result = check()
    except UserError as e:
        error, result = e, None
    if runtime.ddp:
        seen = [None] * runtime.world_size   # (host, message or None) of every rank
        dist.all_gather_object(seen, (socket.gethostname(), None if error is None else
                                      one_line(error)), group=runtime.control_group)
        failed = [(r, host, m) for r, (host, m) in enumerate(seen) if m]
        passed = [(r, host) for r, (host, m) in enumerate(seen) if not m]
        if failed and passed:
            (rank, host, message), (other, other_host) = failed[0], passed[0]
            error = ConfigError(f"rank {rank} on {host}: {message} (rank {other} on "
                                f"{other_host} had no such error{'; ' + hint if hint else ''})")
    if error is not None:
        raise error
    return result


class LostContact(UserError, RuntimeError):
    """Under torchrun a collective failed: another process of the run died (its connections
    closed) or did not answer within the timeout (a frozen node, a cut network). Each node prints
    it: rank 0 may be the one that is gone."""
    every_node = True


# what gloo and NCCL say when a peer is gone: "[.../gloo/...] Read error ...: Connection reset by
# peer", "Timed out waiting 600000ms for recv operation to complete", "Application timeout
# caused pair closure", "NCCL communicator was aborted", ... (plain RuntimeErrors, some of them)
_PEER_GONE = re.compile(r"gloo|NCCL|timed? ?out|connection|pair closure|by peer", re.IGNORECASE)


def lost_contact(error, runtime, timeout):
    """A LostContact for `error` if it is a collective's failure under torchrun, else None."""
    text = str(error)
    if not (runtime.ddp and isinstance(error, RuntimeError) and not isinstance(error, UserError)
            and (isinstance(error, dist.DistError) or _PEER_GONE.search(text))):
        return None
    reason = re.sub(r"^\[[^\]]*\]\s*", "", one_line(text)).split(". ")[0]   # no source path
    within = f"{timeout:g} s" if timeout is not None else "torch's default timeout"
    return LostContact(f"rank {runtime.rank} on {socket.gethostname()} lost contact with the "
                       f"other processes of the run: one died or did not answer within {within} "
                       f"({reason}; the other nodes' logs say which).")


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
