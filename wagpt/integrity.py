"""
Whether a file's tensors can be trusted: a checksum of what was written, verified by every
reader, and a check that the numbers are finite.

    metadata["checksum"] = checksum(named)     # 'xxh3_128:<32 hex digits>'; named: [(name, x)]
    ckpt["checksum"] = checksum(tree_entries(ckpt))   # a torch.save'd dict: tensors and values
    verify(metadata["checksum"], named, path)  # CheckpointError naming the file on a mismatch
    all_finite(tensors)                        # one sum per tensor, one host sync
    first_non_finite(named)                    # the name of the first tensor holding NaN or inf

The checksum is XXH3-128 (the xxhash package) over each entry's name, length and raw bytes in
the order given: about 20 GB/s on one CPU core, a few percent of writing the file
(docs/benchmarks.md). It catches corruption (a flipped bit, a bad disk or copy, a file changed
after it was written), not tampering. Files without one (written before checksums, or by
nanoGPT) are read as before.
"""

import numpy as np
import torch
import xxhash

from wagpt.errors import CheckpointError

ALGORITHM = "xxh3_128"


def tensor_bytes(tensor):
    """The raw bytes of a tensor (copied to the CPU if it is elsewhere), as a numpy array."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def checksum(named):
    """'xxh3_128:<hex>' of [(name, tensor, bytes or str), ...] in the given order."""
    digest = xxhash.xxh3_128()
    for name, value in named:
        if isinstance(value, torch.Tensor):
            value = tensor_bytes(value)
        elif isinstance(value, str):
            value = value.encode()
        data = memoryview(value).cast("B")
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return f"{ALGORITHM}:{digest.hexdigest()}"


def verify(recorded, named, path):
    """Nothing when the checksum `recorded` in the file at `path` matches `named` (or the file
    has none); else a CheckpointError naming the file."""
    if recorded is None:
        return
    if not isinstance(recorded, str) or not recorded.startswith(ALGORITHM + ":"):
        raise CheckpointError(f"{path}: its checksum {str(recorded)[:60]!r} is not one this "
                              f"version reads ({ALGORITHM}); the file is corrupt or newer")
    if checksum(named) != recorded:
        raise CheckpointError(f"{path} is corrupt: its contents do not match the checksum "
                              f"written with it (a damaged disk or copy, or a file changed "
                              f"after it was written); use another copy or an earlier file")


def all_finite(tensors):
    """Whether every floating-point tensor is finite. A NaN or inf anywhere makes the tensor's
    sum non-finite, so one sum per tensor decides it; only when a sum is not finite (a NaN, or
    finite values overflowing it) is every element looked at. CPU tensors are summed by numpy,
    on one thread: the sum is memory-bound, and a multi-threaded torch op on a busy machine
    waits for its threads (20x slower over GPT-2 124M's 75 tensors); the others by torch, with
    one host sync."""
    tensors = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    numpy_ok = [t for t in tensors if t.device.type == "cpu" and t.dtype in _NUMPY_FLOATS]
    rest = [t for t in tensors if not (t.device.type == "cpu" and t.dtype in _NUMPY_FLOATS)]
    with np.errstate(all="ignore"):
        for t in numpy_ok:
            if not np.isfinite(np.sum(t.numpy())) and not np.isfinite(t.numpy()).all():
                return False
    if not rest:
        return True
    sums = torch.stack([t.sum().float().to(rest[0].device) for t in rest])
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in rest)


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def first_non_finite(named):
    """The name of the first floating-point tensor of [(name, tensor)] that holds a NaN or an
    infinity, or None."""
    named = list(named)
    if all_finite([t for _, t in named]):
        return None
    return next(name for name, t in named
                if t.is_floating_point() and not bool(torch.isfinite(t).all()))


def named_tensors(tree, prefix=""):
    """(path, tensor) of every tensor in nested dicts, lists and tuples, in their order."""
    for path, value in leaves(tree, prefix):
        if isinstance(value, torch.Tensor):
            yield path, value


def leaves(tree, prefix=""):
    """(path, value) of every leaf of nested dicts, lists and tuples, in their order
    ('optimizer/state/0/exp_avg')."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from leaves(value, f"{prefix}/{i}" if prefix else str(i))
    else:
        yield prefix, tree


def tree_entries(tree):
    """What the checksum of a torch.save'd dict (a resume checkpoint) covers: every tensor and
    every plain value (numbers, strings, None, as repr), by path, in the dict's order."""
    return [(path, value if isinstance(value, torch.Tensor) else repr(value))
            for path, value in leaves(tree)]
