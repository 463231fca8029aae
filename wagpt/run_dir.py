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
      abandoned/<time>/  what a resume from an older checkpoint (or a restart after a crash
                         before the first one) moved aside: never deleted

Ownership: a run holds an exclusive lock on out_dir/.lock for its whole life (the operating
system releases it when the process ends, however it ends), so a second run into the same
out_dir stops at once, naming the first. A run from scratch (or branching off a file) refuses an
out_dir that already holds another run's artifacts, unless that run stopped before its first
resume checkpoint (crashed_before_first_checkpoint: its files are moved aside); `--init_from=
resume` continues the run that is there, and set_aside keeps one timeline. The temporary files
of writes that a crash interrupted (`.<name>.tmp<pid>`, see atomic_path) are removed when the
next run takes the lock. An analysis (average.py) owns its out_dir the same way, and writes its
results as one set (ResultsDir).

Disk: before anything is written, train.py prints what the run will write (disk_plan: resume
checkpoints kept, snapshots, post-hoc profiles, averaged snapshots) and stops, naming the keys,
when that exceeds the free space of out_dir's file system (check_disk).
"""

import dataclasses
import datetime
import fcntl
import itertools
import json
import os
import re
import shutil
import socket
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from averaging import build_averager
from wagpt import checkpoint
from wagpt.atomic import atomic_write, write_failure
from wagpt.configurator import one_line
from wagpt.errors import UserError, WriteError
from wagpt.online_averaging import averager_hparams, posthoc_profiles

LOCK_NAME = ".lock"
WANDB_ID_NAME = "wandb_run_id"
RUN_ARTIFACTS = ("config.json", "metrics.jsonl", "snapshots", "averaged", "posthoc", "abandoned")
TIMELINE = ("snapshots", "posthoc", "averaged")   # folders of step_N.safetensors files
ABANDONED = "abandoned"
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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise unusable_out_dir(self.path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutDirError(f"{self.path.parent} is in use by another run ({holder}); wait "
                              f"for it to end, or write this run elsewhere with --out_dir=...") \
                from None
        except OSError as e:   # ENOSYS, ENOLCK: e.g. Lustre mounted without -o flock
            os.close(fd)
            raise OutDirError(f"cannot lock {self.path}: {e.strerror}; the file system of out_dir "
                              f"does not support flock (Lustre: mount it with -o flock); write "
                              f"this run to one that does with --out_dir=...") from None
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


def unusable_out_dir(lock_path, error):
    """The UserError of an out_dir whose lock file cannot be made: a file where the folder or
    the lock should be, or a folder that cannot be written."""
    out_dir = lock_path.parent
    blocker = next((p for p in [out_dir, *out_dir.parents] if p.exists() and not p.is_dir()),
                   None)
    if blocker is not None:
        where = "is a file" if blocker == out_dir else f"is under {blocker}, which is a file"
        return OutDirError(f"out_dir {out_dir} {where}, not a folder; choose another --out_dir")
    if lock_path.is_dir():
        return OutDirError(f"{lock_path} is a folder, but it is where a run keeps its lock file; "
                           f"move it away, or choose another --out_dir")
    return WriteError(write_failure(lock_path, error))


def _read_holder(fd):
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    return text or "unknown"


def artifacts(out_dir):
    """The run artifacts out_dir holds: resume checkpoints and RUN_ARTIFACTS that exist."""
    out_dir = Path(out_dir)
    found = [p.name for p in checkpoint.list_resume_checkpoints(out_dir)]
    return found + [name for name in RUN_ARTIFACTS if (out_dir / name).exists()]


def refuse_to_overwrite(out_dir):
    """A new run (scratch or a branch) needs an out_dir without another run's artifacts, or one
    whose run stopped before its first resume checkpoint (a crash: nothing to resume): then
    returns that run's CrashedRun (its files are to be moved aside), else None."""
    found = artifacts(out_dir)
    crashed = crashed_before_first_checkpoint(out_dir) if found else None
    if crashed is not None:
        return crashed
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        how = ("continue that run with --init_from=resume, or " if
               checkpoint.list_resume_checkpoints(out_dir) else "")
        raise OutDirError(f"{out_dir} already holds another run ({shown}); {how}write this run "
                          f"elsewhere with --out_dir=...")


@dataclasses.dataclass
class CrashedRun:
    """A run that stopped before its first resume checkpoint (crashed_before_first_checkpoint)."""
    run_id: str | None   # its id (None: written before runs had ids)
    last_step: int       # the newest step its files record (-1: none)
    first_checkpoint: int   # the step of the resume checkpoint it never reached


def crashed_before_first_checkpoint(out_dir):
    """The CrashedRun of out_dir when its run stopped before writing any resume checkpoint:
    no ckpt_*.pt, and no file or log record of a step at or past the first checkpoint the
    run's config.json says it would write (ckpt_interval, stop_iter, max_iters from the step it
    started at). A run that ended normally, by a signal or stop_iter, always wrote one, so its
    files (even with the checkpoints deleted) are not taken for a crash. None otherwise."""
    out_dir = Path(out_dir)
    if checkpoint.list_resume_checkpoints(out_dir) or not (out_dir / "config.json").is_file():
        return None
    try:
        config = json.loads((out_dir / "config.json").read_text())
        run = config.get("run") or {}
        start = (run.get("parent") or {}).get("step") or 0
        interval, last = int(config["ckpt_interval"]), int(config["max_iters"])
        first = min(start // interval * interval + interval, last,
                    int(config.get("stop_iter") or last))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    steps = timeline_steps(out_dir)
    if (out_dir / "metrics.jsonl").is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # a torn line is reported when the log is opened
            steps += [r["iter"] for r in read_metrics(out_dir / "metrics.jsonl")]
    newest = max(steps, default=-1)
    return CrashedRun(run.get("id"), newest, first) if newest < first else None


def timeline_steps(out_dir):
    """The steps of every snapshot, post-hoc profile and averaged snapshot in out_dir."""
    return [step for _, step in _timeline_files(out_dir)]


def _timeline_files(out_dir):
    out_dir = Path(out_dir)
    found = []
    for name in TIMELINE:
        folder = out_dir / name
        folders = [folder] + sorted(p for p in folder.iterdir() if p.is_dir()) \
            if folder.is_dir() else []
        for directory in folders:
            found += [(p, int(p.stem.split("_")[1])) for p in checkpoint.list_snapshots(directory)]
    return found


def set_aside(out_dir, after_step=None):
    """Move what an abandoned timeline left in out_dir into out_dir/abandoned/<time>/, keeping
    the relative paths (nothing is deleted), and return a one-line account, or None when there
    was nothing to move. after_step=k (a resume from step k): the snapshots, post-hoc profiles
    and averaged snapshots of steps > k and the log records the resumed run writes again;
    None (a run restarted after a crash before its first checkpoint): all of the run's files."""
    out_dir = Path(out_dir)
    moves, records = [], []
    if after_step is None:
        moves = [out_dir / name for name in RUN_ARTIFACTS if name != ABANDONED and
                 (out_dir / name).exists()] + [p for p in [out_dir / WANDB_ID_NAME] if p.exists()]
    else:
        moves = [p for p, step in _timeline_files(out_dir) if step > after_step]
        log = out_dir / "metrics.jsonl"
        if log.is_file():
            kept = read_metrics(log)
            records = [r for r in kept if not _before_restart(r, after_step)]
            kept = [r for r in kept if _before_restart(r, after_step)]
    if not moves and not records:
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = out_dir / ABANDONED / stamp
    for n in itertools.count(2):
        if not folder.exists():
            break
        folder = out_dir / ABANDONED / f"{stamp}-{n}"
    try:
        for path in moves:
            target = folder / path.relative_to(out_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        if records:
            atomic_write(folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
            atomic_write(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    except OSError as e:
        raise WriteError(write_failure(folder, e)) from None
    if after_step is None:
        return f"moved its files to {folder}"
    steps = sorted({int(p.stem.split("_")[1]) for p in moves})
    shown = ", ".join(map(str, steps[:6])) + (", ..." if len(steps) > 6 else "")
    what = [f"{len(moves)} file(s) of steps {shown}"] if moves else []
    what += [f"{len(records)} log record(s)"] if records else []
    return (f"resuming at step {after_step}: moved the abandoned timeline after it "
            f"({' and '.join(what)}) to {folder}")


def latest_resume_or_error(out_dir):
    path = checkpoint.latest_resume(out_dir)
    if path is None:
        raise NoResumeCheckpoint(f"init_from='resume' but {out_dir} holds no resume checkpoint "
                                 f"(ckpt_*.pt); use --init_from=scratch (a run that stopped "
                                 f"before its first one starts over there, its files moved to "
                                 f"{out_dir}/{ABANDONED}/)")
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


def save_config(cfg, path, **extra):
    """Write the resolved config as JSON (the record of what actually ran), with `extra`
    entries (train.py: `run`, the run's identity)."""
    record = {**dataclasses.asdict(cfg), **extra}
    atomic_write(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def new_run_id():
    """A fresh run id: 12 hex digits, random. A run takes one when it starts (from scratch or
    as a branch) and keeps it across resumes; every file it writes records it."""
    return uuid.uuid4().hex[:12]


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
    None where unknown, or where that file system is read-only (writing there fails first, with
    its own error)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return None
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

    check() before anything is written (wandb installed?), start() the W&B run before anything
    is written either (a wandb.init that fails leaves out_dir as it was), then open() keeps the
    records before the step the run restarts from, so the file holds one consistent history.
    Every record is appended as one whole line and flushed; close() ends the W&B run."""

    def __init__(self, cfg, master):
        self.cfg, self.active = cfg, master
        self.path = Path(cfg.out_dir) / "metrics.jsonl"
        self.wandb = None

    def check(self):
        if self.path.exists() and not self.path.is_file():
            raise UserError(f"{self.path} is not a file (a folder?); the log of the run must be "
                            f"one: move it away, or choose another --out_dir")
        if self.cfg.wandb_log:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise UserError("wandb_log=True but wandb is not installed; pip install wandb, "
                                "or --wandb_log=False") from None

    def start(self):
        if self.active and self.cfg.wandb_log:
            self.wandb = _wandb_run(self.cfg)
        return self

    def open(self, resume_iter):
        if not self.active:
            return self
        if self.path.exists():
            keep = [r for r in read_metrics(self.path) if _before_restart(r, resume_iter)]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))
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

    def close(self, failed=False):
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None


def _wandb_run(cfg):
    """One W&B run per out_dir: a new run gets the id wandb picks, kept in out_dir/wandb_run_id;
    --init_from=resume continues that run. W&B's own files go under out_dir/wandb."""
    import wandb
    out_dir = Path(cfg.out_dir)
    id_path = out_dir / WANDB_ID_NAME
    run_id = (id_path.read_text().strip() or None) if (cfg.init_from == "resume"
                                                       and id_path.is_file()) else None
    try:
        run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, id=run_id,
                         resume="allow", dir=str(out_dir), config=dataclasses.asdict(cfg))
    except wandb.errors.Error as e:
        raise UserError(f"wandb_log=True but wandb.init failed ({type(e).__name__}: "
                        f"{one_line(e)}); log in with `wandb login`, or log offline with "
                        f"WANDB_MODE=offline (`wandb sync` uploads it later), or "
                        f"--wandb_log=False") from None
    if run.id != run_id:
        atomic_write(id_path, run.id + "\n")
    return run


def _before_restart(record, resume_iter):
    # the resumed run re-evaluates at its first step, so an eval record there is dropped too
    return record["iter"] < resume_iter or (record["iter"] == resume_iter
                                             and "val_loss" not in record)


# ---------------------------------------------------------------------------------------------
# average.py's out_dir: one result set

RESULT_SET = ("results.json", "results.csv", "plot.png", "saved")   # results.json: the record
_STAGING = re.compile(r"^\.(results|replaced)\.tmp\d+$")


class ResultsDir:
    """An analysis's out_dir (average.py): its results are one set, written whole or not at all.

        results = ResultsDir(out_dir, overwrite).claim()   # the lock; refusal; writability
        ... write every file of the set into results.staging ...
        results.commit()                                   # replaces the old set as one
        results.release()

    claim() takes the out_dir lock (OutDirLock: a second analysis there stops at once), removes
    what an interrupted analysis left (its staging folder), refuses an out_dir holding another
    analysis's results unless `overwrite`, and makes the staging folder `.results.tmp<pid>`
    (which proves the folder writable, before any work). commit() moves the old set aside, the
    new one in (results.json last: a set without it is incomplete) and deletes the old one; a
    failed analysis leaves the old set untouched and its staging folder is removed."""

    def __init__(self, out_dir, overwrite=False):
        self.out_dir, self.overwrite = Path(out_dir), overwrite
        self.lock, self.staging = None, None

    def claim(self):
        self.lock = OutDirLock(self.out_dir).acquire()
        try:
            for leftover in self.out_dir.iterdir():
                if leftover.is_dir() and _STAGING.match(leftover.name):
                    shutil.rmtree(leftover, ignore_errors=True)
            remove_leftover_temporaries(self.out_dir)
            found = [name for name in RESULT_SET if (self.out_dir / name).exists()]
            if found and not self.overwrite:
                raise OutDirError(
                    f"{self.out_dir} holds the results of another analysis "
                    f"({', '.join(found)}); --overwrite=True replaces them, as one set once "
                    f"this analysis is done, or write this one elsewhere with --out_dir=...")
            self.staging = self.out_dir / f".results.tmp{os.getpid()}"
            try:
                self.staging.mkdir()
                atomic_write(self.staging / "writable", b"")
                (self.staging / "writable").unlink()
            except OSError as e:
                raise WriteError(write_failure(self.staging / "writable", e)) from None
        except BaseException:
            self.release()
            raise
        return self

    def commit(self):
        """Replace the result set in out_dir (if any) by the one in the staging folder."""
        old = self.out_dir / f".replaced.tmp{os.getpid()}"
        try:
            old.mkdir(exist_ok=True)
            for name in RESULT_SET:              # results.json first: the old set is retired
                if (self.out_dir / name).exists():
                    os.replace(self.out_dir / name, old / name)
            for name in reversed(RESULT_SET):    # results.json last: the new set is complete
                if (self.staging / name).exists():
                    os.replace(self.staging / name, self.out_dir / name)
            fd = os.open(self.out_dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise WriteError(write_failure(self.out_dir / "results.json", e)) from None
        shutil.rmtree(old, ignore_errors=True)

    def release(self):
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
