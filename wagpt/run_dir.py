"""
A run's out_dir: who owns it, what may be written into it, and its log.

    out_dir/
      .lock              held (flock) by the run writing here; names its pid, host and start
      config.json        the resolved config of the latest invocation
      metrics.jsonl      the log: one JSON object per line (training and eval records)
      wandb_run_id       with wandb_log: the W&B run this out_dir logs to, across resumes
      ckpt_*.pt          resume checkpoints            (checkpoint.py)
      snapshots/         model-only snapshots          (checkpoint.py)
      averaged/          averages saved with --save_averaged

Ownership: a run holds an exclusive lock on out_dir/.lock for its whole life (the operating
system releases it when the process ends, however it ends), so a second run into the same
out_dir stops at once, naming the first. A run from scratch (or branching off a file) refuses an
out_dir that already holds another run's artifacts; `--init_from=resume` continues the run that is
there. The temporary files of writes that a crash interrupted (`.<name>.tmp<pid>`, see
atomic_path) are removed when the next run takes the lock.

Disk: before anything is written, train.py prints what the run will write (disk_plan: resume
checkpoints kept, snapshots, post-hoc profiles, averaged snapshots) and stops, naming the keys,
when that exceeds the free space of out_dir's file system (check_disk).
"""

import dataclasses
import datetime
import fcntl
import json
import os
import re
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

from averaging import build_averager
from wagpt import checkpoint
from wagpt.atomic import atomic_write, write_failure
from wagpt.errors import UserError, WriteError
from wagpt.online_averaging import averager_hparams, posthoc_profiles

LOCK_NAME = ".lock"
WANDB_ID_NAME = "wandb_run_id"
RUN_ARTIFACTS = ("config.json", "metrics.jsonl", "snapshots", "averaged", "posthoc")
_TEMPORARY = re.compile(r"^\..+\.tmp\d+$")


class OutDirError(UserError, FileExistsError):
    """out_dir holds another run or is in use; the message says how to continue or where to go."""


class DiskError(UserError, OSError):
    """The run would write more than out_dir's disk has free; the message names the keys."""


class NoResumeCheckpoint(UserError, FileNotFoundError):
    """init_from='resume' but out_dir holds no resume checkpoint."""


# ---------------------------------------------------------------------------------------------
# ownership

class OutDirLock:
    """An exclusive flock on out_dir/.lock, held from acquire() until release() or the end of the
    process. The file keeps the holder's pid, host and start time, for the message a second run
    gets; a lock file left by a process that is gone is taken over with a warning."""

    def __init__(self, out_dir):
        self.path = Path(out_dir) / LOCK_NAME
        self.fd = None

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutDirError(f"{self.path.parent} is in use by another run ({holder}); wait for "
                              f"it to end, or write this run elsewhere with --out_dir=...") from None
        previous = _read_holder(fd)
        if previous != "unknown":   # the file survived its holder: that run did not end cleanly
            warnings.warn(f"{self.path} was left by a run that is gone ({previous}); taking it "
                          f"over", stacklevel=2)
        holder = (f"pid {os.getpid()} on {socket.gethostname()}, started "
                  f"{datetime.datetime.now().isoformat(timespec='seconds')}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self.fd = fd
        return self

    def release(self):
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)   # an empty lock file: the last holder ended cleanly
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd):
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    return text or "unknown"


def artifacts(out_dir):
    """The run artifacts out_dir holds: resume checkpoints and RUN_ARTIFACTS that exist."""
    out_dir = Path(out_dir)
    found = [p.name for p in checkpoint.list_resume_checkpoints(out_dir)]
    return found + [name for name in RUN_ARTIFACTS if (out_dir / name).exists()]


def refuse_to_overwrite(out_dir):
    """A new run (scratch or a branch) needs an out_dir without another run's artifacts."""
    found = artifacts(out_dir)
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        how = ("continue that run with --init_from=resume, or " if
               checkpoint.list_resume_checkpoints(out_dir) else "")
        raise OutDirError(f"{out_dir} already holds another run ({shown}); {how}write this run "
                          f"elsewhere with --out_dir=...")


def latest_resume_or_error(out_dir):
    path = checkpoint.latest_resume(out_dir)
    if path is None:
        raise NoResumeCheckpoint(f"init_from='resume' but {out_dir} holds no resume checkpoint "
                                 f"(ckpt_*.pt); use --init_from=scratch")
    return path


def remove_leftover_temporaries(out_dir):
    """Remove the temporary files of interrupted writes under out_dir (only names this project
    gives them, `.<name>.tmp<pid>`); call with the lock held. Returns (files, bytes) removed."""
    removed, size = 0, 0
    for path in Path(out_dir).rglob(".*.tmp*"):
        if path.is_file() and _TEMPORARY.match(path.name):
            size += path.stat().st_size
            path.unlink(missing_ok=True)
            removed += 1
    return removed, size


def save_config(cfg, path):
    """Write the resolved config as JSON (the record of what actually ran)."""
    atomic_write(path, json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# the disk a run will write

@dataclass
class DiskPlan:
    """What a run writes to out_dir from its start step to max_iters, in bytes, by kind."""
    items: list          # [(what, files, bytes per file, the keys that set it)]

    @property
    def total(self):
        return sum(files * size for _, files, size, _ in self.items)

    def describe(self, out_dir, free=None):
        parts = [f"{what} {files} x {_size(size)}" for what, files, size, _ in self.items
                 if files]
        room = f" ({_size(free)} free)" if free is not None else ""
        return f"disk: {_size(self.total)} to write to {out_dir}{room}: {', '.join(parts)}"


def disk_plan(cfg, numel, start_step=0):
    """The DiskPlan of a training config for a model of `numel` float32 parameters: the resume
    checkpoints kept (weights, AdamW's two moments, every average's and post-hoc profile's state),
    the snapshots, the post-hoc profile files (one snapshot's size per profile, with every
    snapshot once the profiles have acted) and, with save_averaged, each average at every
    snapshot from its burn-in on and at the end."""
    copy = 4 * numel
    averagers = {name: build_averager(name, **hp) for name, hp in averager_hparams(cfg).items()}
    profiles = posthoc_profiles(cfg)
    state = sum(a.state_copies() for a in averagers.values()) + len(profiles)
    end, every = cfg.max_iters, cfg.snapshot_interval
    first = 0 if start_step == 0 else (start_step // every + 1) * every if every else 0
    snapshots = range(first, end + 1, every) if every else range(0)   # θ_0's too, from scratch
    every_ckpt = cfg.ckpt_interval   # at its multiples before max_iters, and at max_iters
    checkpoints = max(0, (end - 1) // every_ckpt - start_step // every_ckpt) + 1
    kept = min(checkpoints, cfg.keep_last) if cfg.keep_last else checkpoints
    after = cfg.posthoc_update_after + cfg.posthoc_update_freq
    averaged = 0
    if cfg.save_averaged:
        for a in averagers.values():
            averaged += len([s for s in snapshots if s >= a.tau and s > start_step]) + \
                (end not in snapshots)   # not with θ_0's snapshot; at the end in any case
    return DiskPlan([
        ("resume checkpoints", kept, copy * (3 + state), "keep_last, ckpt_interval"),
        ("snapshots", len(snapshots), copy, "snapshot_interval"),
        ("post-hoc profile files", len([s for s in snapshots if s >= after]) if profiles else 0,
         copy * len(profiles), "posthoc_sigma_rel (None: off), snapshot_interval"),
        ("averaged snapshots", averaged, copy, "save_averaged, snapshot_interval")])


def check_disk(plan, out_dir):
    """DiskError when `plan` does not fit in the free space of out_dir's file system."""
    free = free_space(out_dir)
    if free is not None and plan.total > free:
        biggest = sorted((item for item in plan.items if item[1]),
                         key=lambda item: -item[1] * item[2])
        keys = "; ".join(f"{what} {files} x {_size(size)} ({how})"
                         for what, files, size, how in biggest)
        raise DiskError(f"this run would write {_size(plan.total)} to {out_dir} but its disk has "
                        f"{_size(free)} free; change the keys of the largest items: {keys}")
    return free


def free_space(path):
    """Free bytes on the file system that holds `path` (or would: its nearest existing parent);
    None where unknown."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _size(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# metrics.jsonl

def read_metrics(path):
    """The records of a metrics.jsonl; a line that is not a whole JSON object (a write the disk
    or a crash cut short) is dropped with a warning naming the file and line."""
    records = []
    path = Path(path)
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("iter"), int):
                raise ValueError("not a record with an integer 'iter'")
        except ValueError as e:
            warnings.warn(f"{path}:{number}: dropped a torn or corrupt line ({e}): "
                          f"{line[:80]!r}", stacklevel=2)
            continue
        records.append(record)
    return records


class MetricsLog:
    """stdout's records as out_dir/metrics.jsonl (+ wandb). Only rank 0 writes.

    check() before anything is written (wandb installed?), then open() keeps the records before
    the step the run restarts from, so the file holds one consistent history. Every record is
    appended as one whole line and flushed."""

    def __init__(self, cfg, master):
        self.cfg, self.active = cfg, master
        self.path = Path(cfg.out_dir) / "metrics.jsonl"
        self.wandb = None

    def check(self):
        if self.cfg.wandb_log:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise UserError("wandb_log=True but wandb is not installed; pip install wandb, "
                                "or --wandb_log=False") from None

    def open(self, resume_iter):
        if not self.active:
            return self
        if self.path.exists():
            keep = [r for r in read_metrics(self.path) if _before_restart(r, resume_iter)]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        if self.cfg.wandb_log:
            self.wandb = _wandb_run(self.cfg)
        return self

    def write(self, record):
        if not self.active:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")   # one write of a whole line
                f.flush()
        except OSError as e:
            raise WriteError(write_failure(self.path, e)) from None
        if self.wandb is not None:
            self.wandb.log(record, step=record["iter"])


def _wandb_run(cfg):
    """One W&B run per out_dir: its id is kept in out_dir/wandb_run_id and resumed; W&B's own
    files go under out_dir/wandb."""
    import wandb
    out_dir = Path(cfg.out_dir)
    id_path = out_dir / WANDB_ID_NAME
    run_id = id_path.read_text().strip() if id_path.is_file() else wandb.util.generate_id()
    run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, id=run_id,
                     resume="allow", dir=str(out_dir), config=dataclasses.asdict(cfg))
    if not id_path.is_file():
        atomic_write(id_path, run_id + "\n")
    return run


def _before_restart(record, resume_iter):
    # the resumed run re-evaluates at its first step, so an eval record there is dropped too
    return record["iter"] < resume_iter or (record["iter"] == resume_iter
                                             and "val_loss" not in record)
