"""
Checkpoint and snapshot files.

Two kinds of files, both safe to load (no pickle that can run code):

    out_dir/ckpt_0001000.pt                  resume checkpoint (torch.save, loaded weights_only=True):
                                             model, optimizer, iter_num, tokens_seen, config, model_args.
                                             The keys model/model_args/iter_num are nanoGPT's, so
                                             nanoGPT tools read it. The last `keep_last` are kept.
    out_dir/snapshots/step_0001000.safetensors
                                             model-only snapshot of the trajectory, never pruned: the
                                             float32 weights (tied lm_head stored once) plus metadata
                                             {format, step, tokens_seen, model_args (JSON)}. This is
                                             what offline averaging reads.

Every file is written atomically: to a temporary file in the same directory, flushed and fsynced,
then os.replace'd over the final name. A crash mid-write leaves the previous files untouched and
loadable; a file counts as written only once it has its final name.
"""

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

RESUME_FORMAT = "wa-resume-v1"
SNAPSHOT_FORMAT = "wa-snapshot-v1"
_RESUME_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
_SNAPSHOT_NAME = re.compile(r"^step_(\d+)\.safetensors$")


class CheckpointError(ValueError):
    """A missing, corrupt or unsafe checkpoint; the message names the file."""


# ---------------------------------------------------------------------------------------------
# atomic writes

def atomic_write(path, write_fn):
    """Call write_fn(file_object) on a temp file, fsync it, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # fsync the directory so the rename itself survives a power loss
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def unwrap_model(model):
    """The bare module under DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)          # DistributedDataParallel
    return getattr(model, "_orig_mod", model)        # torch.compile


def model_state(model):
    """State dict of the bare model, with tied tensors stored once (the first name kept)."""
    seen, state = set(), {}
    for name, tensor in unwrap_model(model).state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach()
    return state


def load_model_state(model, state, source):
    """Load `state` into the bare model; names missing only because they are tied are fine."""
    model = unwrap_model(model)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = _tied_names(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")


def _tied_names(model):
    first, tied = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in first:
            tied.add(name)
        first.setdefault(tensor.data_ptr(), name)
    return tied


# ---------------------------------------------------------------------------------------------
# resume checkpoints

def resume_path(out_dir, iter_num):
    return Path(out_dir) / f"ckpt_{iter_num:07d}.pt"


def list_resume_checkpoints(out_dir):
    """Resume checkpoints in out_dir, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _RESUME_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_resume(out_dir, payload, keep_last):
    """Write payload (with its iter_num) as the newest resume checkpoint; prune older ones."""
    path = resume_path(out_dir, payload["iter_num"])
    atomic_write(path, lambda f: torch.save({"format": RESUME_FORMAT, **payload}, f))
    if keep_last > 0:  # prune only after the new file is safely in place
        for old in list_resume_checkpoints(out_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def load_resume(path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # weights_only=True: only tensors and plain containers; a pickle that would run code fails
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a loadable checkpoint (truncated, corrupt, or "
                              f"contains objects that are unsafe to unpickle): {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint (no 'model' entry)")
    return ckpt


def latest_resume(out_dir):
    """The newest resume checkpoint in out_dir (complete: writes are atomic), or None."""
    checkpoints = list_resume_checkpoints(out_dir)
    return checkpoints[-1] if checkpoints else None


# ---------------------------------------------------------------------------------------------
# snapshots

def snapshot_path(snapshot_dir, step):
    return Path(snapshot_dir) / f"step_{step:07d}.safetensors"


def list_snapshots(snapshot_dir):
    snapshot_dir = Path(snapshot_dir)
    found = [(int(m.group(1)), p) for p in snapshot_dir.iterdir()
             if (m := _SNAPSHOT_NAME.match(p.name))] if snapshot_dir.is_dir() else []
    return [p for _, p in sorted(found)]


def save_snapshot(snapshot_dir, model, step, tokens_seen, model_args, extra=None):
    """Write the model's float32 weights and where they sit on the trajectory."""
    # copies: the weights are views into one flat buffer, which safetensors refuses to share
    tensors = {k: v.to("cpu", torch.float32, copy=True) for k, v in model_state(model).items()}
    metadata = {"format": SNAPSHOT_FORMAT, "step": str(step), "tokens_seen": str(tokens_seen),
                "model_args": json.dumps(model_args, sort_keys=True)}
    metadata.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    blob = safetensors_save(tensors, metadata=metadata)
    return atomic_write(snapshot_path(snapshot_dir, step), lambda f: f.write(blob))


def load_snapshot(path):
    """(state_dict, info) of a snapshot; info has step, tokens_seen, model_args."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"snapshot {path} does not exist")
    blob = path.read_bytes()
    try:
        state = safetensors_load(blob)
        metadata = _safetensors_metadata(blob)
        info = {"step": int(metadata["step"]), "tokens_seen": int(metadata["tokens_seen"]),
                "model_args": json.loads(metadata["model_args"])}
    except (SafetensorError, KeyError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a valid snapshot (truncated, corrupt or missing "
                              f"metadata): {e}") from e
    return state, info


def _safetensors_metadata(blob):
    # safetensors layout: 8-byte little-endian header length, then a JSON header
    header_len = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + header_len]).get("__metadata__") or {}


# ---------------------------------------------------------------------------------------------
# any weights file (for --init_from=PATH)

def load_weights(path):
    """(state_dict, info) from a snapshot or a resume/nanoGPT checkpoint.

    info: step, tokens_seen (None if unknown), model_args, and the optimizer and averager
    states when present (None otherwise).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state, info = load_snapshot(path)
        return state, {**info, "optimizer": None, "averaging": None}
    ckpt = load_resume(path)
    return ckpt["model"], {"step": int(ckpt.get("iter_num", 0)),
                           "tokens_seen": ckpt.get("tokens_seen"),
                           "model_args": ckpt.get("model_args"),
                           "optimizer": ckpt.get("optimizer"),
                           "averaging": ckpt.get("averaging")}
