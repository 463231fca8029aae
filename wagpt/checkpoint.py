"""
Checkpoint files: the one writer, the one reader, and a directory of them as a trajectory.

Files this project writes (every one atomically, wagpt/atomic.py):

    out_dir/ckpt_0001000.pt                  resume checkpoint (torch.save, read weights_only=True):
                                             model, optimizer, averaging, posthoc, iter_num,
                                             tokens_seen, config, model_args, sampler, run,
                                             checksum. The keys
                                             model/model_args/iter_num are nanoGPT's, so nanoGPT
                                             tools read it. The last `keep_last` are kept.
    out_dir/snapshots/step_0001000.safetensors
                                             model-only snapshot of the trajectory, never pruned:
                                             the float32 weights (tied lm_head stored once) plus
                                             metadata
                                             {format, step, tokens_seen, model_args (JSON), run
                                             (JSON), checksum}. This is what offline averaging
                                             reads.
    out_dir/averaged/<method>/step_....safetensors
                                             an average, as a snapshot whose metadata adds
                                             `averager` and `hparams` (JSON)
    out_dir/posthoc/step_0001000.safetensors
                                             the post-hoc EMA profiles at a snapshot step: the
                                             float32 weights of each stored power-function EMA,
                                             named `<profile>/<parameter>` (the snapshot layout
                                             under a prefix such as `sigma_rel=0.05/`), plus
                                             metadata {format, step, tokens_seen, model_args,
                                             profiles (JSON: each one's name, sigma_rel, gamma,
                                             update_after τ, update_freq φ, last_update), run,
                                             checksum}.
                                             Written and read by save_posthoc / read_posthoc;
                                             read_checkpoint refuses it (it is no one model).

Files it reads (`read_checkpoint`, one record for all of them): those three, nanoGPT-style
checkpoints as nanoGPT, the LAWA code and the Coupled Adam code write them (a torch.save'd dict
with `model` (keys may carry `_orig_mod.`; the `attn.bias` mask buffers of non-flash attention are
dropped), `model_args` and `iter_num`), and transformers GPT-2 folders (hf_gpt2.py, the inverse
of export_hf.py). Nothing is unpickled that could run code
(weights_only=True); a .pt is memory-mapped, so only the tensors that are used are paged in.

Every file is written through atomic.py: a crash mid-write leaves the previous files untouched
and loadable, and a file counts as written only once it has its final name. `run` is the run
that wrote it ({"id", "parent"}: run_dir.new_run_id; a branch's parent is the run and step it
started from); `checksum` covers its tensors and metadata (integrity.py), and every reader
verifies it and refuses non-finite tensors when it reads the tensors. Files without them
(written before, or by nanoGPT) are read as before.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from model import GPT, GPTConfig
from wagpt import hf_gpt2, integrity
from wagpt.atomic import atomic_write
from wagpt.errors import CheckpointError

RESUME_FORMAT = "wa-resume-v1"
SNAPSHOT_FORMAT = "wa-snapshot-v1"
POSTHOC_FORMAT = "wa-posthoc-v1"
SUFFIXES = (".safetensors", ".pt", ".pth")
_RESUME_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
_SNAPSHOT_NAME = re.compile(r"^step_(\d+)\.safetensors$")
_MASK_BUFFER = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")   # nanoGPT's non-flash causal mask


# ---------------------------------------------------------------------------------------------
# model state

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
    """Copy `state` into the bare model; names missing only because they are tied are fine."""
    model = unwrap_model(model)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:   # a tensor whose shape differs from the model's
        raise CheckpointError(f"{source} does not fit the model: {one_line_shapes(e)}") from None
    tied = _tied_names(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")


def one_line_shapes(error):
    lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
    return "; ".join(lines[:3]) or " ".join(str(error).split())[:300]


def _tied_names(model):
    first, tied = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in first:
            tied.add(name)
        first.setdefault(tensor.data_ptr(), name)
    return tied


# ---------------------------------------------------------------------------------------------
# writing resume checkpoints and snapshots

def resume_path(out_dir, iter_num):
    return Path(out_dir) / f"ckpt_{iter_num:07d}.pt"


def list_resume_checkpoints(out_dir):
    """Resume checkpoints in out_dir, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _RESUME_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_resume(out_dir):
    """The newest resume checkpoint in out_dir (complete: writes are atomic), or None."""
    checkpoints = list_resume_checkpoints(out_dir)
    return checkpoints[-1] if checkpoints else None


def save_resume(out_dir, payload, keep_last):
    """Write payload (with its iter_num) as the newest resume checkpoint; prune older ones."""
    path = resume_path(out_dir, payload["iter_num"])
    payload = {"format": RESUME_FORMAT, **payload}
    payload["checksum"] = integrity.checksum(integrity.tree_entries(payload))
    atomic_write(path, lambda f: torch.save(payload, f))
    if keep_last > 0:  # prune only after the new file is safely in place
        for old in list_resume_checkpoints(out_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def snapshot_path(snapshot_dir, step):
    return Path(snapshot_dir) / f"step_{step:07d}.safetensors"


def list_snapshots(snapshot_dir):
    snapshot_dir = Path(snapshot_dir)
    found = [(int(m.group(1)), p) for p in snapshot_dir.iterdir()
             if (m := _SNAPSHOT_NAME.match(p.name))] if snapshot_dir.is_dir() else []
    return [p for _, p in sorted(found)]


def save_snapshot(snapshot_dir, model, step, tokens_seen, model_args, extra=None, run=None):
    """Write the model's float32 weights and where they sit on the trajectory (and on which
    run: `run` = {"id", "parent"}, see run_dir.new_run_id)."""
    # copies: the weights are views into one flat buffer, which safetensors refuses to share
    tensors = {k: v.to("cpu", torch.float32, copy=True) for k, v in model_state(model).items()}
    metadata = {"format": SNAPSHOT_FORMAT, "step": str(step), "tokens_seen": str(tokens_seen),
                "model_args": json.dumps(model_args, sort_keys=True)}
    if run is not None:
        metadata["run"] = json.dumps(run, sort_keys=True)
    metadata.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    blob = safetensors_save(tensors, metadata=_with_checksum(tensors, metadata))
    return atomic_write(snapshot_path(snapshot_dir, step), blob)


def save_posthoc(posthoc_dir, profiles, step, tokens_seen, model_args, run=None):
    """Write the post-hoc EMA profiles of one step as one file: `profiles` is
    [(info, state)] with info = {name, sigma_rel, gamma, update_after, update_freq, last_update}
    and state the profile's weights as a model state dict (checkpoint.model_state's names)."""
    tensors = {}
    for info, state in profiles:
        for key, value in state.items():
            tensors[f"{info['name']}/{key}"] = value.to("cpu", torch.float32, copy=True)
    metadata = {"format": POSTHOC_FORMAT, "step": str(step), "tokens_seen": str(tokens_seen),
                "model_args": json.dumps(model_args, sort_keys=True),
                "profiles": json.dumps([info for info, _ in profiles])}
    if run is not None:
        metadata["run"] = json.dumps(run, sort_keys=True)
    return atomic_write(snapshot_path(posthoc_dir, step),
                        safetensors_save(tensors, metadata=_with_checksum(tensors, metadata)))


def _with_checksum(tensors, metadata):
    """The metadata of a safetensors file plus the checksum of its tensors and metadata."""
    return {**metadata, "checksum": integrity.checksum(_safetensors_entries(
        sorted(tensors.items()), metadata))}


def _safetensors_entries(named, metadata):
    """What a safetensors file's checksum covers: its metadata (but the checksum) and every
    tensor's bytes, by name in sorted order."""
    shown = json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True)
    return [("__metadata__", shown), *named]


def _verified_safetensors(path, blob, header):
    """The tensors of a safetensors file's bytes, after its checksum (if it has one) is
    verified and every tensor is found finite; CheckpointError naming the file else."""
    try:
        tensors = safetensors_load(blob)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or "
                              f"corrupt?): {e}") from None
    metadata = header.get("__metadata__") or {}
    if "checksum" in metadata:
        start = 8 + int.from_bytes(blob[:8], "little")
        data = memoryview(blob)
        try:
            named = [(name, data[start + info["data_offsets"][0]:start + info["data_offsets"][1]])
                     for name, info in sorted(header.items()) if name != "__metadata__"]
        except (KeyError, TypeError, IndexError) as e:
            raise CheckpointError(f"{path} has a corrupt header: {e}") from None
        integrity.verify(metadata["checksum"], _safetensors_entries(named, metadata), path)
    _check_finite(path, tensors.items())
    return tensors


def _check_finite(path, named):
    bad = integrity.first_non_finite(named)
    if bad is not None:
        raise CheckpointError(f"{path}: {bad} holds NaN or infinite values; training, averaging "
                              f"or evaluating from it would spread them (training never saves "
                              f"such a file): use another checkpoint")


@dataclass
class PosthocRecord:
    """A file of post-hoc EMA profiles (save_posthoc)."""
    path: Path
    step: int
    tokens_seen: int | None
    model_args: dict
    profiles: list               # [{name, sigma_rel, gamma, update_after, update_freq,
                                 #   last_update}], in the file's order
    weights: dict | None = None  # profile name -> {parameter name -> tensor}; None when read
                                 # with tensors=False
    run: dict | None = None      # the run that wrote it: {"id", "parent"} (None: older files)


_PROFILE_KEYS = {"name": str, "sigma_rel": float, "gamma": float, "update_after": int,
                 "update_freq": int, "last_update": int}


def read_posthoc(path, tensors=True):
    """The PosthocRecord of a file save_posthoc wrote; CheckpointError naming the file when it
    is missing, truncated, corrupt or not such a file. tensors=False reads only its header."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"post-hoc profile file {path} does not exist")
    blob, header = _read_safetensors_header(path, tensors)
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != POSTHOC_FORMAT:
        raise CheckpointError(f"{path} is not a file of post-hoc EMA profiles (its format is "
                              f"{metadata.get('format')!r}, not {POSTHOC_FORMAT!r}; train.py "
                              f"writes them to out_dir/posthoc/)")
    try:
        profiles = json.loads(metadata["profiles"])
        for info in profiles:
            for key, kind in _PROFILE_KEYS.items():
                if not isinstance(info[key], kind) and not (kind is float and
                                                            isinstance(info[key], int)):
                    raise ValueError(f"profile entry {key}={info[key]!r}")
        model_args = json.loads(metadata["model_args"])
        step = _int_step(metadata["step"], path)
        tokens = metadata.get("tokens_seen")
        run = _run_identity(json.loads(metadata["run"]) if "run" in metadata else None)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} has corrupt metadata: {e}") from None
    weights = None
    if tensors:
        flat = _verified_safetensors(path, blob, header)
        weights = {info["name"]: {} for info in profiles}
        for key, value in flat.items():
            name, _, parameter = key.partition("/")
            if name not in weights:
                raise CheckpointError(f"{path}: tensor {key!r} belongs to no listed profile")
            weights[name][parameter] = value
    return PosthocRecord(path, step, int(tokens) if tokens is not None else None,
                         _check_model_args(model_args, path), profiles, weights, run)


def _run_identity(run):
    """A file's record of the run that wrote it, checked: {"id": str, "parent": None or
    {"id": str or None, "step": int}} (a branch records the run and step it started from), or
    None for files written before runs had ids."""
    if run is None:
        return None
    parent = run.get("parent") if isinstance(run, dict) else None
    if not (isinstance(run, dict) and isinstance(run.get("id"), str) and run["id"]) or not (
            parent is None or isinstance(parent, dict) and isinstance(parent.get("step"), int)
            and (parent.get("id") is None or isinstance(parent.get("id"), str))):
        raise ValueError(f"run {str(run)[:80]!r} is not {{'id': ..., 'parent': ...}}")
    return {"id": run["id"], "parent": parent}


# ---------------------------------------------------------------------------------------------
# the one reader

@dataclass
class Checkpoint:
    """What any supported file holds. Fields a kind of file does not have are None."""
    path: Path
    kind: str                    # 'resume' | 'snapshot' | 'nanogpt' | 'pretrained' (hf_gpt2)
    model_args: dict             # GPTConfig fields
    step: int | None             # the file's own record, else the last number in its name
    tokens_seen: int | None = None
    weights: dict | None = None  # name -> tensor (no _orig_mod. prefix, no mask buffers);
                                 # None when read with tensors=False
    optimizer: dict | None = None   # resume checkpoints
    averaging: dict | None = None   # resume checkpoints: every averager's state
    posthoc: dict | None = None     # resume checkpoints: the post-hoc EMA profiles' state
    averager: str | None = None     # averaged snapshots: the method ...
    hparams: dict | None = None     # ... and its hyperparameters
    config: dict | None = None      # resume checkpoints: the run's resolved config
    run: dict | None = None         # the run that wrote it: {"id", "parent"} (None: older or
                                    # nanoGPT files, pretrained models)
    data: dict | None = None        # the data it trained on (dataloader.data_record: dataset,
                                    # data_dir, vocab_size, tokenizer, chars), where recorded

    def tensors(self):
        """Every tensor the record holds: weights, optimizer, averager and post-hoc profile
        state."""
        found = list((self.weights or {}).values())
        pending = [self.optimizer, self.averaging, self.posthoc]
        while pending:
            item = pending.pop()
            if isinstance(item, dict):
                pending += list(item.values())
            elif isinstance(item, (list, tuple)):
                pending += list(item)
            elif isinstance(item, torch.Tensor):
                found.append(item)
        return found


def read_checkpoint(path, tensors=True):
    """The record of any checkpoint file (see the module docstring); raises CheckpointError
    naming the file when it is missing, truncated, corrupt, unsafe to unpickle, not a model
    checkpoint, or of an architecture model.py does not have. tensors=False reads only what
    describes the file (for a snapshot, its header)."""
    if str(path) in hf_gpt2.PRETRAINED and not Path(path).exists() or (
            Path(path).is_dir() and (Path(path) / "config.json").is_file()):
        return _read_pretrained(str(path))   # 'gpt2' ... 'gpt2-xl', a transformers folder
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file; give one file "
                              f"(ckpt_*.pt or *.safetensors) or a transformers GPT-2 folder")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, tensors)
    return _read_torch(path, tensors)


def _read_pretrained(source):
    """A released GPT-2 or a transformers GPT-2 folder (hf_gpt2.load_pretrained) as a record:
    step 0, no tokens seen, no optimizer or averager state. Training from it starts at step 0,
    so every averager's θ₀ is the pretrained model."""
    state, model_args = hf_gpt2.load_pretrained(source)
    return Checkpoint(Path(source), "pretrained", model_args, step=0, tokens_seen=0,
                      weights=state)


def read_step(path):
    """The step of a checkpoint file from its header alone (fast: for ordering a directory)."""
    record = read_checkpoint(path, tensors=False)
    if record.step is None:
        raise CheckpointError(f"{path}: no step recorded in the file (metadata 'step' or "
                              f"'iter_num') and no number in its name")
    return record.step


def load_model(path, device="cpu"):
    """(GPT in eval mode on `device`, its Checkpoint record) from any checkpoint file."""
    record = read_checkpoint(path)
    try:
        model = GPT(GPTConfig(**record.model_args))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: model_args {record.model_args} do not build a GPT: "
                              f"{e}") from None
    load_model_state(model, record.weights, path)
    return model.to(device).eval(), record


def _read_safetensors_header(path, whole_file):
    """(the file's bytes if whole_file else None, its parsed header)."""
    try:
        if whole_file:
            blob = path.read_bytes()
            return blob, _safetensors_header(blob[:8], memoryview(blob)[8:], path)   # no copy
        with open(path, "rb") as f:
            size_bytes = f.read(8)
            return None, _safetensors_header(size_bytes, f.read(_header_size(size_bytes, path)),
                                             path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or "
                              f"corrupt?): {e}") from None


def _read_safetensors(path, tensors):
    blob, header = _read_safetensors_header(path, tensors)
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") == POSTHOC_FORMAT:
        raise CheckpointError(f"{path} holds post-hoc EMA profiles (several averages of one "
                              f"step), not one model: average.py reads them itself for "
                              f"--methods=phema; give it the run's snapshots/ as --ckpt_dir")
    if "model_args" not in metadata:
        raise CheckpointError(f"{path} has no model_args metadata: not a snapshot of this "
                              f"project (checkpoint.save_snapshot writes them)")
    try:
        model_args = json.loads(metadata["model_args"])
        tokens = metadata.get("tokens_seen")
        averaging_info = {k: json.loads(metadata[k]) for k in ("averager", "hparams", "data")
                          if k in metadata}
        step = _int_step(metadata["step"], path) if "step" in metadata else _name_step(path)
        run = _run_identity(json.loads(metadata["run"]) if "run" in metadata else None)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path} has corrupt metadata: {e}") from None
    weights = _verified_safetensors(path, blob, header) if tensors else None
    return Checkpoint(path, "snapshot", _check_model_args(model_args, path), step,
                      tokens_seen=int(tokens) if tokens is not None else None, weights=weights,
                      averager=averaging_info.get("averager"),
                      hparams=averaging_info.get("hparams"), run=run,
                      data=averaging_info.get("data"))


def _header_size(size_bytes, path):
    size = int.from_bytes(size_bytes, "little")
    if len(size_bytes) != 8 or not 0 < size < 100_000_000:
        raise ValueError(f"header length {size}")
    return size


def _safetensors_header(size_bytes, rest, path):
    size = _header_size(size_bytes, path)
    if len(rest) < size:
        raise ValueError("the file ends inside its header")
    return json.loads(bytes(rest[:size]))


def _read_torch(path, tensors):
    ckpt = _torch_load(path)
    if not isinstance(ckpt.get("model"), dict) or "model_args" not in ckpt:
        raise CheckpointError(f"{path} is not a model checkpoint: it needs 'model' and "
                              f"'model_args' entries (has {sorted(ckpt)[:6]})")
    if tensors:   # reads every tensor (the file is memory-mapped): only when they are used
        integrity.verify(ckpt.get("checksum"), integrity.tree_entries(
            {k: v for k, v in ckpt.items() if k != "checksum"}), path)
        _check_finite(path, integrity.named_tensors({k: ckpt.get(k) for k in (
            "model", "optimizer", "averaging", "posthoc")}))
    weights = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    weights = {k: v for k, v in weights.items() if not _MASK_BUFFER.search(k)}
    step = _int_step(ckpt["iter_num"], path) if "iter_num" in ckpt else _name_step(path)
    tokens = ckpt.get("tokens_seen")
    try:
        run = _run_identity(ckpt.get("run"))
    except ValueError as e:
        raise CheckpointError(f"{path} has a corrupt entry: {e}") from None
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    data = ckpt.get("data") or ({"dataset": config["dataset"], "data_dir": config.get("data_dir")}
                                if isinstance(config.get("dataset"), str) else None)  # nanoGPT's
    return Checkpoint(path, "resume" if ckpt.get("format") == RESUME_FORMAT else "nanogpt",
                      _check_model_args(ckpt["model_args"], path), step,
                      tokens_seen=int(tokens) if tokens is not None else None,
                      weights=weights if tensors else None, optimizer=ckpt.get("optimizer"),
                      averaging=ckpt.get("averaging"), posthoc=ckpt.get("posthoc"),
                      config=ckpt.get("config"), run=run, data=data)


def _torch_load(path):
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            # a legacy (pre-zip) torch.save file: readable, only not mappable
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a loadable checkpoint (truncated, corrupt, not "
                              f"saved by torch.save, or holding objects that are unsafe to "
                              f"unpickle): {' '.join(str(e).split())[:300]}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def _check_model_args(model_args, path):
    if not isinstance(model_args, dict):
        raise CheckpointError(f"{path}: model_args is a {type(model_args).__name__}, not a dict")
    known = set(GPTConfig.__dataclass_fields__)
    extra = {k: v for k, v in model_args.items() if k not in known}
    changes_the_model = {k: v for k, v in extra.items() if v not in (None, False, 0)}
    if changes_the_model:
        raise CheckpointError(f"{path}: model_args {changes_the_model} describe an architecture "
                              f"model.py does not have; its loss here would be wrong")
    return {k: v for k, v in model_args.items() if k in known}


def _int_step(value, path):
    try:
        step = int(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: its step {value!r} is not an integer") from None
    if step < 0:
        raise CheckpointError(f"{path}: its step is {step}; a step counts optimizer updates and "
                              f"is >= 0 (the file is corrupt or was not written by training)")
    return step


def _name_step(path):
    numbers = re.findall(r"\d+", Path(path).stem)
    return int(numbers[-1]) if numbers else None


# ---------------------------------------------------------------------------------------------
# a directory of checkpoints: a trajectory

@dataclass
class TrajectoryFile:
    path: Path
    step: int
    model_args: dict
    run: dict | None = None   # the run that wrote it (Checkpoint.run)


def discover(directory):
    """(files in step order, other files ignored, [(path, reason)] of checkpoint-named files
    whose header cannot be read). Raises CheckpointError for a missing or empty directory; two
    files of one step are both listed (see duplicate_steps). Hidden files (the temporaries of
    writes in progress) are skipped."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    files, ignored, bad = [], [], []
    for path in sorted(directory.iterdir()):
        if path.is_dir() or path.name.startswith("."):
            continue
        if path.suffix not in SUFFIXES:
            ignored.append(path)
            continue
        try:
            record = read_checkpoint(path, tensors=False)
            files.append(TrajectoryFile(path, read_step(path) if record.step is None
                                        else record.step, record.model_args, record.run))
        except CheckpointError as e:
            bad.append((path, str(e)))
    if not files and not bad:
        raise CheckpointError(f"{directory} holds no checkpoints (*.safetensors, *.pt, *.pth)")
    files.sort(key=lambda f: (f.step, f.path.name))
    return files, ignored, bad


def duplicate_steps(files):
    """{step: [files]} of the steps that more than one file claims."""
    by_step = {}
    for f in files:
        by_step.setdefault(f.step, []).append(f)
    return {step: group for step, group in by_step.items() if len(group) > 1}
