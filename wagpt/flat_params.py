"""
The model's parameters as views into one contiguous buffer per (dtype, device).

After `flat = FlatParameters(model)`, every parameter's storage is a slice of `flat.buffer`, so
"all the weights" is one 1-D tensor: an averaging update over the whole model is one pass over
one buffer (one kernel launch, no gather copy), and swapping averaged weights in for evaluation is
one copy. Nothing else changes: the parameters are the same nn.Parameter objects (optimizers, DDP,
torch.compile and load_state_dict see ordinary contiguous tensors), gradients stay separate.

Build it after the model is on its device and before wrapping it: `model.to(...)` or
`load_state_dict(..., assign=True)` afterwards would give parameters new storage, which
`check()` detects (the averagers would otherwise average stale memory).

Each parameter starts at a multiple of ALIGN_BYTES, as a fresh allocation would: misaligned
pointers send some BLAS/cuBLAS and vectorised kernels down slower paths. The few padding entries
between parameters are zero and stay zero under every averaging rule.
"""

from contextlib import contextmanager

import torch

ALIGN_BYTES = 128


class FlatParameters:
    def __init__(self, model):
        # named_parameters() yields a tied parameter once (under its first name, the one
        # checkpoint.model_state keeps), so it is stored (and averaged) once
        named = list(model.named_parameters())
        if not named:
            raise ValueError("the model has no parameters to flatten")
        by_key = {}
        for name, p in named:
            by_key.setdefault((p.dtype, p.device), []).append((name, p))
        self.groups = [_flatten(group) for group in by_key.values()]

    @property
    def buffer(self):
        """The single flat buffer (a model of one dtype on one device, as train.py builds)."""
        if len(self.groups) != 1:
            kinds = ", ".join(f"{g.buffer.dtype} on {g.buffer.device}" for g in self.groups)
            raise ValueError(f"the model's parameters have {len(self.groups)} dtype/device "
                             f"combinations ({kinds}); online averaging needs one: keep the "
                             f"weights float32 on one device and train in bf16 with autocast")
        return self.groups[0].buffer

    def check(self):
        """Raise if a parameter no longer lives in its slice of the buffer."""
        for group in self.groups:
            group.check()

    def flat_from_state(self, state, source, device=None):
        """A new flat tensor in `buffer`'s layout (on `device`, default the buffer's) holding
        the weights of the state dict `state` (parameter name -> tensor, as
        checkpoint.model_state names them; padding zero), without touching the model: how a
        stored average becomes a vector the averaging math takes. `source` names it in errors."""
        group = self.groups[0] if len(self.groups) == 1 else None
        if group is None:
            self.buffer   # raises, naming the dtype/device combinations
        out = torch.zeros_like(group.buffer, device=device)
        missing = [name for name in group.names if name not in state]
        if missing:
            raise ValueError(f"{source} lacks the parameters {missing[:5]}")
        for name, p, offset in zip(group.names, group.params, group.offsets):
            tensor = state[name]
            if tuple(tensor.shape) != tuple(p.shape):
                raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model "
                                 f"{tuple(p.shape)}")
            out[offset:offset + p.numel()].copy_(tensor.reshape(-1))
        return out

    @contextmanager
    def swapped(self, weights):
        """Temporarily load `weights` (a flat tensor like `buffer`, any float dtype) into the
        model; the live weights are restored bitwise on exit, also on an exception."""
        buffer = self.buffer
        if weights.shape != buffer.shape:
            raise ValueError(f"weights have shape {tuple(weights.shape)}, the flat parameters "
                             f"{tuple(buffer.shape)}")
        live = buffer.clone()
        try:
            with torch.no_grad():
                buffer.copy_(weights)
            del weights   # copied: do not hold a second model-sized tensor during the block
            yield
        finally:
            with torch.no_grad():
                buffer.copy_(live)


class _Group:
    def __init__(self, buffer, names, params, offsets):
        self.buffer, self.names, self.params, self.offsets = buffer, names, params, offsets

    def check(self):
        base, size = self.buffer.data_ptr(), self.buffer.element_size()
        for p, offset in zip(self.params, self.offsets):
            if p.data_ptr() != base + offset * size or not p.is_contiguous():
                raise RuntimeError(
                    f"a parameter of shape {tuple(p.shape)} no longer lives in the flat buffer "
                    "(model.to(), load_state_dict(assign=True) or a `.data =` after flattening); "
                    "build FlatParameters after the model is on its device and loaded")


def _flatten(named):
    names, params = [name for name, _ in named], [p for _, p in named]
    dtype, device = params[0].dtype, params[0].device
    align = max(1, ALIGN_BYTES // params[0].element_size())
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += -(-p.numel() // align) * align   # round up: the next one starts aligned
    buffer = torch.zeros(total, dtype=dtype, device=device)
    with torch.no_grad():
        for p, offset in zip(params, offsets):
            view = buffer[offset:offset + p.numel()].view(p.shape)
            view.copy_(p)
            p.data = view   # same Parameter object, new storage: optimizers and DDP see no change
    return _Group(buffer, names, params, offsets)
