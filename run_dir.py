"""
A run's out_dir: what may be written into it, and its log.

    out_dir/
      config.json        the resolved config of the latest invocation
      metrics.jsonl      the log: one JSON object per line (training and eval records)
      ckpt_*.pt          resume checkpoints            (checkpoint.py)
      snapshots/         model-only snapshots          (checkpoint.py)
      averaged/          averages saved with --save_averaged

A run starting from scratch (or branching off a file) refuses an out_dir that holds another run's
resume checkpoints; `--init_from=resume` continues the run that is there.
"""

import dataclasses
import json
from pathlib import Path

import checkpoint
from configurator import UserError


class OutDirError(UserError, FileExistsError):
    """out_dir holds another run; the message says how to continue it or where to go instead."""


class NoResumeCheckpoint(UserError, FileNotFoundError):
    """init_from='resume' but out_dir holds no resume checkpoint."""


def refuse_to_overwrite(out_dir):
    if checkpoint.list_resume_checkpoints(out_dir):
        raise OutDirError(
            f"{out_dir} already holds resume checkpoints of another run; continue it with "
            f"--init_from=resume, or write this run elsewhere with --out_dir=...")


def latest_resume_or_error(out_dir):
    path = checkpoint.latest_resume(out_dir)
    if path is None:
        raise NoResumeCheckpoint(f"init_from='resume' but {out_dir} holds no resume checkpoint "
                                 f"(ckpt_*.pt); use --init_from=scratch")
    return path


class MetricsLog:
    """stdout's records as out_dir/metrics.jsonl (+ wandb). Only rank 0 writes.

    check() before anything is written (wandb installed?), then open() drops the records past
    the step the run restarts from, so the file holds one consistent history."""

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
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _before_restart(json.loads(line), resume_iter)]
            checkpoint.atomic_write(self.path, "".join(line + "\n" for line in keep))
        if self.cfg.wandb_log:
            import wandb
            self.wandb = wandb.init(project=self.cfg.wandb_project, name=self.cfg.wandb_run_name,
                                    config=dataclasses.asdict(self.cfg))
        return self

    def write(self, record):
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["iter"])


def _before_restart(record, resume_iter):
    # the resumed run re-evaluates at its first step, so an eval record there is dropped too
    return record["iter"] < resume_iter or (record["iter"] == resume_iter
                                             and "val_loss" not in record)
