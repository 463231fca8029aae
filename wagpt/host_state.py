"""
Averager state in host memory, updated chunk by chunk through the device: for offline sweeps
whose state does not fit on the GPU (average.py --state_device=host, or 'auto' when its memory
estimate exceeds the device's free memory).

    averager = HostStateAverager(lambda: build_averager("ema", allow_gaps=True, ema_decay=0.9),
                                 numel, device=torch.device("cuda"), chunk=2**24)
    averager.update(step, theta)          # theta: the flat weights, on the device
    averaged = averager.average()         # the full average, on the device

Every update rule of averaging.py is elementwise (LAWA's and the windowed averages' means are
over their copies of one entry, too), so an averager over the flat vector is exactly a set of
independent averagers over its slices, the same fact DDP sharding rests on
(online_averaging.py). Here each slice of `chunk` entries is its own averager whose float32
buffers live in pinned CPU memory; an update copies one slice's state to the device, runs the
averager's own update there, and copies the state back. The math is averaging.py's, untouched,
so the results equal those of state on the device bit for bit (tests/test_average.py checks it
on the CPU, where the copies are no-ops and only the chunking remains).

Cost per update and setting: the state crosses the host link twice (state copies × 4 bytes ×
parameters each way). On a GPU the chunks are pipelined over three streams: while chunk i is
updated on the current stream, chunk i + 1 is copied in on one copy stream and chunk i − 1 copied
back on another, so the link carries both directions at once and the update costs about one
crossing of the state (docs/benchmarks.md has the figures). Device memory: at most three chunks of
state at a time.
"""

import torch


class HostStateAverager:
    """An Averager-like wrapper (update, average, swapped_in, state_dict, step, hparams) over
    per-chunk averagers made by `build()`, their state on the host."""

    def __init__(self, build, numel, device, chunk):
        if chunk < 1:
            raise ValueError(f"chunk={chunk}: must be >= 1 parameters")
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"   # pinned memory needs (and helps only) CUDA
        self.numel = numel
        self.parts = [(lo, min(lo + chunk, numel), build()) for lo in range(0, numel, chunk)]
        first = self.parts[0][2]
        self.name, self.hparams = first.name, first.hparams
        self._streams = None   # (copy in, copy back) on a GPU, made at the first update

    @property
    def step(self):
        return self.parts[0][2].step

    def state_copies(self):
        return self.parts[0][2].state_copies()

    def memory_bytes(self):
        return sum(a.memory_bytes() for _, _, a in self.parts)

    def update(self, step, theta):
        if self.device.type != "cuda":   # the "device" is host memory: the chunks in turn
            acted = False
            for lo, hi, averager in self.parts:
                host = self._to_device(averager)
                acted = averager.update(step, theta[lo:hi])
                self._to_host(averager, host)
            return acted
        return self._pipelined(lambda averager, lo, hi: averager.update(step, theta[lo:hi]))

    def _pipelined(self, work):
        """work(averager, lo, hi) for every chunk on the current stream, with the chunk's state
        copied in beforehand on one stream and back afterwards on another, one chunk ahead and
        one behind; returns the last work's result."""
        compute = torch.cuda.current_stream(self.device)
        if self._streams is None:
            self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        copy_in, copy_out = self._streams
        copy_in.wait_stream(compute)   # the last update's copies back are done (see the end)

        def stage(averager):
            with torch.cuda.stream(copy_in):
                host = self._to_device(averager)
            for name in host:   # used on the other streams: not to be reused before they are done
                getattr(averager, name).record_stream(compute)
                getattr(averager, name).record_stream(copy_out)
            return host, copy_in.record_event()

        in_flight, result = [], False
        staged = stage(self.parts[0][2])
        for i, (lo, hi, averager) in enumerate(self.parts):
            host, ready = staged
            if i + 1 < len(self.parts):
                if len(in_flight) >= 2:      # at most three chunks of state on the device
                    in_flight.pop(0).synchronize()
                staged = stage(self.parts[i + 1][2])
            compute.wait_event(ready)
            result = work(averager, lo, hi)
            for name in averager.buffers:   # buffers the work made (its initialisation)
                tensor = getattr(averager, name)
                if tensor is not None and tensor.is_cuda and name not in host:
                    tensor.record_stream(copy_out)
            copy_out.wait_event(compute.record_event())
            with torch.cuda.stream(copy_out):
                self._to_host(averager, host)
            in_flight.append(copy_out.record_event())
        compute.wait_stream(copy_out)   # later readers of the host state see it written
        return result

    def average(self):
        """The full average as one new float32 tensor on the device, or None before the
        averagers' first update."""
        if self.step is None:
            return None
        out = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        for lo, hi, averager in self.parts:
            host = self._to_device(averager)
            out[lo:hi].copy_(averager.average())
            self._restore(averager, host)
        return out

    def swapped_in(self, flat):
        averaged = self.average()
        if averaged is None:
            raise RuntimeError(f"{self.name} has no average yet")
        return flat.swapped(averaged)

    def state_dict(self):
        """The state of one averager over the whole vector (the chunks' tensors joined), as the
        averager on the device would have it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)   # the last copies back may still be in flight
        states = [a.state_dict() for _, _, a in self.parts]
        out = dict(states[0])
        out["numel"] = -1 if states[0]["numel"] < 0 else self.numel
        out["tensors"] = {key: torch.cat([s["tensors"][key] for s in states], dim=-1)
                          for key in states[0]["tensors"]}
        return out

    # ---------------------------------------------------------------------------- copies

    def _to_device(self, averager):
        """Point the averager's buffers at device copies; returns the host tensors."""
        host = {}
        for name in averager.buffers:
            tensor = getattr(averager, name)
            if tensor is not None:
                host[name] = tensor
                setattr(averager, name, tensor.to(self.device, non_blocking=True))
        return host

    def _to_host(self, averager, host):
        """Copy the (updated or new) device buffers back into host memory, which they point to
        again."""
        for name in averager.buffers:
            tensor = getattr(averager, name)
            if tensor is None:
                continue
            target = host.get(name)
            if target is None:   # made by this update (the averager's initialisation)
                target = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.pin)
            if target is not tensor:
                target.copy_(tensor, non_blocking=True)
            setattr(averager, name, target)

    def _restore(self, averager, host):
        """Point the buffers at the host tensors again, unchanged (after a read)."""
        for name, tensor in host.items():
            setattr(averager, name, tensor)
