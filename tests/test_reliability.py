"""A run's data is never lost, poisoned or mixed: non-finite state is never saved, an out_dir
belongs to one run, resume survives torn logs and leftover temporaries and keeps the saved
architecture, every bad input names its culprit, and kill -9 / SIGTERM / a full disk leave every
file loadable. docs/reliability.md lists what is promised and these tests."""

import dataclasses
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import average
import eval_ckpt
import train
from eval_ckpt import EvalConfig
from model import GPT, GPTConfig
from wagpt import checkpoint, offline_averaging, run_dir
from wagpt.configurator import load_config, main
from wagpt.dataloader import DataError, TokenDataset
from wagpt.errors import CheckpointError, ConfigError, WriteError
from wagpt.offline_averaging import AverageConfig
from wagpt.throughput import BenchConfig, measure_throughput
from wagpt.trainer import NonFiniteLossError, TrainConfig, newest_finite_checkpoint

REPO = Path(__file__).resolve().parent.parent
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
        "--eval_iters=2", "--device=cpu", "--learning_rate=1e-2", "--min_lr=1e-3",
        "--warmup_iters=2"]
FAULT_TRIALS = int(os.environ.get("WA_FAULT_TRIALS", "3"))   # kill -9 trials (docs: 100)


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def all_files_load(out_dir):
    """Every checkpoint, snapshot and post-hoc profile file in out_dir loads and is finite;
    metrics.jsonl parses
    (a torn last line dropped). Returns the resume checkpoints' steps."""
    out_dir = Path(out_dir)
    steps = []
    for path in checkpoint.list_resume_checkpoints(out_dir):
        record = checkpoint.read_checkpoint(path)
        assert all(torch.isfinite(t).all() for t in record.tensors() if t.is_floating_point())
        steps.append(record.step)
    for path in checkpoint.list_snapshots(out_dir / "snapshots"):
        assert all(torch.isfinite(t).all() for t in checkpoint.read_checkpoint(path)
                   .weights.values())
    for path in checkpoint.list_snapshots(out_dir / "posthoc"):
        assert all(torch.isfinite(t).all() for state in checkpoint.read_posthoc(path)
                   .weights.values() for t in state.values())
    if (out_dir / "metrics.jsonl").exists():
        run_dir.read_metrics(out_dir / "metrics.jsonl")
    return steps


# ---------------------------------------------------------------------------------------------
# 1. non-finite state is never saved

def test_a_diverging_run_saves_nothing_non_finite(make_config):
    """The repro: --learning_rate=1e6 --ckpt_interval=2 --log_interval=3 used to write NaN
    weights into ckpt_0000002.pt and call it good."""
    cfg = make_config(learning_rate=1e6, ckpt_interval=2, log_interval=3, max_iters=200,
                      eval_interval=1000, warmup_iters=0)
    with pytest.raises(NonFiniteLossError, match="nothing was saved") as error:
        train.train(cfg)
    all_files_load(cfg.out_dir)
    newest = newest_finite_checkpoint(cfg.out_dir)
    assert newest == checkpoint.latest_resume(cfg.out_dir)
    if newest is None:
        assert "No finite checkpoint exists" in str(error.value)
    else:
        assert f"The newest finite checkpoint is {newest} (checked)" in str(error.value)


def test_non_finite_weights_are_not_saved_and_the_message_names_a_checked_file(make_config,
                                                                              monkeypatch):
    cfg = make_config(max_iters=12, ckpt_interval=4, log_interval=100, eval_interval=100)
    real_step = train.train_step
    calls = {"n": 0}

    def step_that_poisons(model, optimizer, *args, **kwargs):
        calls["n"] += 1
        loss = real_step(model, optimizer, *args, **kwargs)
        if calls["n"] == 6:   # the weights go NaN; the loss of this step still looks fine
            with torch.no_grad():
                next(iter(model.parameters())).view(-1)[0] = float("nan")
        return loss
    monkeypatch.setattr(train, "train_step", step_that_poisons)
    with pytest.raises(NonFiniteLossError, match="ckpt_0000004.pt \\(checked\\)"):
        train.train(cfg)
    assert [p.name for p in checkpoint.list_resume_checkpoints(cfg.out_dir)] == \
        ["ckpt_0000004.pt"]
    all_files_load(cfg.out_dir)


def test_the_newest_finite_checkpoint_is_verified_not_assumed(make_config):
    cfg = make_config(max_iters=8, keep_last=0)
    train.train(cfg)
    newest = checkpoint.latest_resume(cfg.out_dir)
    record = checkpoint.read_checkpoint(newest)
    poisoned = {k: v.clone() for k, v in record.weights.items()}
    next(iter(poisoned.values())).view(-1)[0] = float("nan")
    torch.save({"format": checkpoint.RESUME_FORMAT, "model": poisoned,
                "model_args": record.model_args, "iter_num": record.step}, newest)
    assert newest_finite_checkpoint(cfg.out_dir).name == "ckpt_0000004.pt"


# ---------------------------------------------------------------------------------------------
# 2. one run per out_dir

def test_a_new_run_refuses_an_out_dir_with_any_run_artifact(make_config, tmp_path):
    train.train(make_config(out_dir=str(tmp_path / "a"), snapshot_interval=4, max_iters=8))
    # keep the snapshots and the log, lose the resume checkpoints
    for path in checkpoint.list_resume_checkpoints(tmp_path / "a"):
        path.unlink()
    before = {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    with pytest.raises(run_dir.OutDirError, match="already holds another run .*snapshots"):
        train.train(make_config(out_dir=str(tmp_path / "a")))
    assert {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()} == before


def test_a_second_run_into_a_busy_out_dir_stops_at_once(make_config, tmp_path):
    cfg = make_config(init_from="scratch")
    with run_dir.OutDirLock(cfg.out_dir):   # another run holds it
        with pytest.raises(run_dir.OutDirError, match=f"in use by another run \\(pid "
                                                      f"{os.getpid()}"):
            train.train(cfg)
    assert not checkpoint.list_resume_checkpoints(cfg.out_dir)
    train.train(cfg)   # released: now it runs


def test_two_runs_started_at_once_do_not_mix(tiny_data_dir, tmp_path):
    out = tmp_path / "shared"
    args = [sys.executable, "train.py", f"--out_dir={out}", f"--data_dir={tiny_data_dir}",
            "--max_iters=40", "--log_interval=1", "--eval_interval=20", "--ckpt_interval=10",
            *TINY]
    procs = [subprocess.Popen(args, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(code for _, _, code in results)
    assert codes == [0, 2], results
    loser = next(err for _, err, code in results if code == 2)
    assert "error: " in loser and ("in use by another run" in loser or
                                   "already holds another run" in loser)
    records = run_dir.read_metrics(out / "metrics.jsonl")
    assert [r["iter"] for r in records if "loss" in r] == list(range(1, 41))   # one history


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(make_config):
    cfg = make_config(max_iters=4)
    Path(cfg.out_dir).mkdir(parents=True)
    (Path(cfg.out_dir) / ".lock").write_text("pid 999999 on elsewhere, started 2026-01-01")
    with pytest.warns(UserWarning, match="left by a run that is gone \\(pid 999999"):
        train.train(cfg)
    assert (Path(cfg.out_dir) / ".lock").read_text() == ""   # released cleanly


# ---------------------------------------------------------------------------------------------
# 3. a torn metrics.jsonl

def test_resume_drops_a_torn_last_line_with_a_warning(make_config):
    cfg = make_config(max_iters=8, stop_iter=4)
    train.train(cfg)
    log = Path(cfg.out_dir) / "metrics.jsonl"
    with open(log, "a") as f:
        f.write('{"iter": 5, "lr": 0.01, "lo')   # the disk filled up mid-append
    with pytest.warns(UserWarning, match="metrics.jsonl:\\d+: dropped a torn or corrupt line"):
        train.train(make_config(max_iters=8, init_from="resume"))
    records = [json.loads(line) for line in log.read_text().splitlines()]   # all whole now
    assert [r["iter"] for r in records if "loss" in r] == [2, 4, 6, 8]


# ---------------------------------------------------------------------------------------------
# 3b. one timeline per out_dir; a crash before the first checkpoint; the data order

def files_under(directory):
    return {p.relative_to(directory): p.read_bytes() for p in Path(directory).rglob("*")
            if p.is_file() and p.name != ".lock"}


def test_resuming_from_an_older_checkpoint_sets_the_abandoned_timeline_aside(make_config,
                                                                            capsys):
    """Resuming at step 4 of a run that reached 8 used to leave the old steps 6 and 8 in
    snapshots/ and posthoc/, to be interleaved with the new ones."""
    common = dict(max_iters=8, snapshot_interval=2, ckpt_interval=4, keep_last=0,
                  save_averaged=True, averaging="ema", ema_update_after=0, log_interval=2,
                  eval_interval=100)
    cfg = make_config(**common)
    train.train(cfg)
    out = Path(cfg.out_dir)
    checkpoint.resume_path(out, 8).unlink()
    before = files_under(out)
    capsys.readouterr()
    train.train(make_config(**{**common, "max_iters": 6}, init_from="resume", learning_rate=3e-3))
    line = next(line for line in capsys.readouterr().out.splitlines() if "abandoned" in line)
    folder = Path(re.search(r"to (\S+/abandoned/\S+)$", line).group(1))
    assert re.match(r"resuming at step 4: moved the abandoned timeline after it \(6 file\(s\) "
                    r"of steps 6, 8 and \d+ log record\(s\)\)", line), line
    aside = files_under(folder)
    for sub in ("snapshots", "posthoc", "averaged/ema"):
        for step in (6, 8):   # moved, not deleted, byte for byte
            name = Path(sub) / f"step_{step:07d}.safetensors"
            assert aside[name] == before[name]
        for step in (0, 2, 4):          # up to the resume point: untouched
            name = Path(sub) / f"step_{step:07d}.safetensors"
            if name in before:             # (no profile or average at step 0)
                assert files_under(out)[name] == before[name]
    assert sorted(int(p.stem[5:]) for p in checkpoint.list_snapshots(out / "snapshots")) == \
        [0, 2, 4, 6]
    old_log = [r["iter"] for r in run_dir.read_metrics(folder / "metrics.jsonl") if "loss" in r]
    assert old_log == [6, 8]
    assert [r["iter"] for r in run_dir.read_metrics(out / "metrics.jsonl") if "loss" in r] == \
        [2, 4, 6]
    summary = average.average(AverageConfig(ckpt_dir=str(out / "snapshots"),
                                            out_dir=str(out.parent / "avg"),
                                            data_dir=cfg.data_dir, eval_iters=1, batch_size=4,
                                            device="cpu", methods="ema", plot=False))
    assert sorted({r["step"] for r in summary["rows"]}) == [0, 2, 4, 6]


def test_a_run_that_crashed_before_its_first_checkpoint_starts_over_in_its_out_dir(
        make_config, monkeypatch, capsys):
    """--init_from=resume said "use scratch" and scratch said "holds another run"."""
    cfg = make_config(max_iters=20, ckpt_interval=250, snapshot_interval=2, log_interval=2)
    real_step = train.train_step
    calls = {"n": 0}

    def crash_at_step_7(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise MemoryError("the machine went away")
        return real_step(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", crash_at_step_7)
    with pytest.raises(MemoryError):
        train.train(cfg)
    monkeypatch.undo()
    out = Path(cfg.out_dir)
    crashed_id = json.loads((out / "config.json").read_text())["run"]["id"]
    before = files_under(out)
    with pytest.raises(run_dir.NoResumeCheckpoint, match="use --init_from=scratch"):
        train.train(make_config(max_iters=20, init_from="resume"))
    capsys.readouterr()
    train.train(cfg)
    lines = [line for line in capsys.readouterr().out.splitlines() if crashed_id in line]
    assert len(lines) == 1 and re.match(
        f"{out} holds run {crashed_id}, which stopped at step 6 before its first resume "
        f"checkpoint \\(step 20\\): starting over as a new run [0-9a-f]{{12}}; moved its files to "
        f"{out}/abandoned/", lines[0]), lines
    folder = Path(lines[0].split("moved its files to ")[1])
    assert files_under(folder) == before   # nothing lost
    assert json.loads((out / "config.json").read_text())["run"]["id"] != crashed_id
    assert checkpoint.latest_resume(out).name == "ckpt_0000020.pt"


def test_a_resume_keeps_the_seed(make_config, tmp_path):
    cfg = make_config(max_iters=8, stop_iter=4, seed=7)
    train.train(cfg)
    files = files_under(cfg.out_dir)
    with pytest.raises(ConfigError, match="seed=5 but .*ckpt_0000004.pt was trained with seed=7; "
                                          "a resume continues the same data order: drop --seed"):
        train.train(make_config(max_iters=8, init_from="resume", seed=5))
    assert files_under(cfg.out_dir) == files
    train.train(make_config(max_iters=8, init_from="resume"))   # the seed not given: the saved
    assert json.loads((Path(cfg.out_dir) / "config.json").read_text())["seed"] == 7
    assert checkpoint.read_checkpoint(checkpoint.latest_resume(cfg.out_dir)).config["seed"] == 7


def test_profiles_switched_off_on_resume_are_one_line_naming_what_can_be_reconstructed(
        make_config, tiny_data_dir, tmp_path, capsys):
    """--posthoc_sigma_rel=None on resume (documented) used to end in a traceback of the
    least-squares solve (coefficients summing to 5.69e-13)."""
    cfg = make_config(max_iters=8, stop_iter=4, snapshot_interval=2)
    train.train(cfg)
    train.train(make_config(max_iters=8, snapshot_interval=2, init_from="resume",
                            posthoc_sigma_rel=None))
    line = one_line_error(AVERAGE, [f"--ckpt_dir={Path(cfg.out_dir) / 'snapshots'}",
                                    f"--out_dir={tmp_path / 'avg'}", f"--data_dir={tiny_data_dir}",
                                    "--methods=phema", "--device=cpu", "--eval_iters=1",
                                    "--batch_size=4", "--plot=False"], capsys)
    assert re.search(r"do not reach steps 6, 8, .* the steps that can be reconstructed are 2, 4\.",
                     line), line


# ---------------------------------------------------------------------------------------------
# 4. SIGTERM under torchrun

def test_sigterm_under_torchrun_stops_every_rank_at_one_step_and_saves(tiny_data_dir, tmp_path):
    """log_interval far past the run: the stop flag must not wait for a log step."""
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "train.py", f"--out_dir={out}", f"--data_dir={tiny_data_dir}",
            "--max_iters=100000", "--log_interval=8000", "--eval_interval=100000",
            "--ckpt_interval=100000", "--gradient_accumulation_steps=2", *TINY]
    proc = subprocess.Popen(args, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:   # training is under way once the first eval is printed
        if line.startswith("step 0:"):
            break
    time.sleep(2)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)   # to the launcher, which forwards it to the workers
    stdout, stderr = proc.communicate(timeout=120)
    took = time.time() - sent
    assert "stopped by SIGTERM at step" in stdout, stderr[-2000:]
    step = int(stdout.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert checkpoint.latest_resume(out).name == f"ckpt_{step:07d}.pt"
    assert took < 30   # inside torchrun's grace period before it kills the workers
    # torchrun itself exits 1 when it is signalled (docs/reliability.md), the workers 0
    assert proc.returncode in (0, 1)
    resumed = subprocess.run([sys.executable, "train.py", f"--out_dir={out}",
                              f"--data_dir={tiny_data_dir}", f"--max_iters={step + 2}",
                              "--init_from=resume", "--gradient_accumulation_steps=2",
                              "--log_interval=1", "--eval_interval=100000",
                              "--ckpt_interval=100000", *TINY],
                             cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and f"start at step {step}" in resumed.stdout


def test_the_stop_flag_is_read_one_step_after_it_is_raised():
    """Alone, poll() answers at once; the DDP path (async all-reduce read a step later) is
    exercised by the torchrun test above."""
    from wagpt.runtime import StopSignal
    stop = StopSignal(None)
    assert not stop.poll()
    stop.requested = "SIGTERM"
    assert stop.poll()


# ---------------------------------------------------------------------------------------------
# 5. resume and branch keep the saved architecture

@pytest.mark.parametrize("args, key", [(["--n_layer=3", "--n_embd=48"], "n_layer=3"),
                                       (["--block_size=8"], "block_size=8"),
                                       (["--block_size=64"], "block_size=64"),
                                       (["--bias=True"], "bias=True"),
                                       (["--model_size=gpt2"], "model_size='gpt2'")])
def test_resume_with_other_architecture_keys_is_an_error_before_anything_is_written(
        args, key, tiny_data_dir, tmp_path):
    base = [f"--data_dir={tiny_data_dir}", f"--out_dir={tmp_path / 'run'}", "--max_iters=4",
            "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--device=cpu",
            "--eval_iters=2", "--batch_size=4", "--warmup_iters=1"]
    train.train(load_config(TrainConfig, base))
    files = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    resume = [a for a in base
              if not a.startswith(("--n_layer", "--n_head", "--n_embd", "--block_size"))]
    with pytest.raises(ConfigError, match=f"{key}.* holds a model with"):
        train.train(load_config(TrainConfig, resume + ["--init_from=resume", "--max_iters=8",
                                                       *args]))
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == files
    # keys not given are the checkpoint's: config.json records the model that trains
    train.train(load_config(TrainConfig, resume + ["--init_from=resume", "--max_iters=6"]))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["n_layer"], saved["n_embd"], saved["block_size"]) == (2, 32, 16)
    last = checkpoint.read_checkpoint(checkpoint.latest_resume(tmp_path / "run"))
    assert last.tokens_seen == 6 * 4 * 16   # batches of the model's context, counted right


def test_a_branch_keeps_the_files_architecture(make_config, tmp_path):
    train.train(make_config(out_dir=str(tmp_path / "a"), max_iters=4))
    with pytest.raises(ConfigError, match="n_embd=48 but .*ckpt_0000004.pt holds a model with "
                                          "n_embd=32"):
        train.train(make_config(out_dir=str(tmp_path / "b"), n_embd=48, averaging="",
                                init_from=str(tmp_path / "a" / "ckpt_0000004.pt")))
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------
# 6. temporaries of interrupted writes

def test_leftover_temporaries_are_removed_at_start_and_only_ours(make_config):
    cfg = make_config(max_iters=8, stop_iter=4, snapshot_interval=4)
    train.train(cfg)
    out = Path(cfg.out_dir)
    ours = [out / ".ckpt_0000008.pt.tmp4242", out / "snapshots" / ".step_0000008.safetensors.tmp7"]
    for path in ours:
        path.write_bytes(b"half a checkpoint")
    theirs = [out / "notes.tmp", out / ".my_editor_swap.tmp"]
    for path in theirs:
        path.write_text("keep me")
    train.train(make_config(max_iters=8, init_from="resume", snapshot_interval=4))
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)


# ---------------------------------------------------------------------------------------------
# 7. average.py: memory, the trajectory's model, --skip_bad

@pytest.fixture(scope="module")
def snapshots(tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("traj")
    train.train(TrainConfig(data_dir=str(tiny_data_dir), out_dir=str(out), n_layer=2, n_head=2,
                            n_embd=32, block_size=16, batch_size=4, max_iters=6, eval_interval=6,
                            eval_iters=2, log_interval=6, ckpt_interval=6, warmup_iters=1,
                            device="cpu", snapshot_interval=1, averaging=""))
    return out / "snapshots"


def copy_dir(src, dst):
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def avg_config(ckpt_dir, tiny_data_dir, tmp_path, **kw):
    return AverageConfig(**{**dict(ckpt_dir=str(ckpt_dir), out_dir=str(tmp_path / "avg"),
                                   data_dir=str(tiny_data_dir), eval_iters=1, batch_size=4,
                                   device="cpu", methods="ema", plot=False), **kw})


def test_the_memory_of_a_sweep_is_printed_and_checked(snapshots, tiny_data_dir, tmp_path,
                                                      monkeypatch, capsys):
    cfg = avg_config(snapshots, tiny_data_dir, tmp_path, methods="lawa,bema",
                     lawa_k=[3, 5], bema_bias_power=[-1.0, 0.2])
    average.average(cfg)
    # lawa 3 + 5, bema (off) 1 + (on) 3 = 12 copies of the weights, + model, swap, temporary
    printed = capsys.readouterr().out
    assert "(12 state copies of 4 settings + 3)" in printed and "GiB" in printed
    monkeypatch.setattr(offline_averaging, "available_memory", lambda device: 1000)
    with pytest.raises(ConfigError, match="the sweep needs .* GiB but cpu has 0.0 GiB "
                                          "available: sweep fewer settings"):
        average.average(dataclasses.replace(cfg, overwrite=True))


def test_a_stray_first_file_cannot_decide_the_model(snapshots, tiny_data_dir, tmp_path):
    """A file of another model at the first step used to make every real snapshot "bad"."""
    directory = copy_dir(snapshots, tmp_path / "in")
    (directory / "step_0000000.safetensors").unlink()
    args = dict(block_size=16, vocab_size=21, n_layer=1, n_head=2, n_embd=16)
    stray = checkpoint.save_snapshot(tmp_path / "stray", GPT(GPTConfig(**args)), 0,
                                     0, args)
    stray.rename(directory / "a_0.safetensors")
    with pytest.raises(CheckpointError, match="a_0.safetensors is a checkpoint of "
                                                         "another model"):
        average.average(avg_config(directory, tiny_data_dir, tmp_path))
    with pytest.warns(UserWarning, match="a_0.safetensors"):
        summary = average.average(avg_config(directory, tiny_data_dir, tmp_path,
                                             skip_bad=True))
    assert [s["file"] for s in summary["skipped"]] == ["a_0.safetensors"]
    assert {r["step"] for r in summary["rows"]} == set(range(1, 7))
    assert all(r["val_loss"] > 0 for r in summary["rows"])


def test_two_files_of_one_step_are_skipped_with_skip_bad(snapshots, tiny_data_dir, tmp_path):
    directory = copy_dir(snapshots, tmp_path / "in")
    (directory / "copy_of_3.safetensors").write_bytes(
        (directory / "step_0000003.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="both step 3"):
        average.average(avg_config(directory, tiny_data_dir, tmp_path))
    with pytest.warns(UserWarning, match="both step 3"):
        summary = average.average(avg_config(directory, tiny_data_dir, tmp_path,
                                             skip_bad=True))
    assert sorted(s["file"] for s in summary["skipped"]) == \
        ["copy_of_3.safetensors", "step_0000003.safetensors"]
    assert 3 not in {r["step"] for r in summary["rows"]} and \
        {r["step"] for r in summary["rows"]} >= {2, 4}


def poisoned(path, dst, kind):
    """A copy of the snapshot or profile file `path` at `dst` with one NaN, written as a tool
    other than train.py would (no checksum)."""
    tensors, metadata = load_file(path), safe_open(path, "pt").metadata()
    metadata.pop("checksum")
    name = next(k for k in sorted(tensors) if k.endswith("wte.weight"))
    tensors[name][3, 1] = float("nan")
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dst, metadata=metadata)
    return name


@pytest.mark.parametrize("kind", ["snapshot", "profile", "init_from", "eval"])
def test_a_non_finite_input_is_named_before_anything_is_written(kind, snapshots, tiny_data_dir,
                                                                tmp_path):
    """One NaN used to give `nan` rows and exit 0 (average.py), or a learning-rate message
    (--init_from)."""
    run = copy_dir(snapshots, tmp_path / "run" / "snapshots").parent
    copy_dir(snapshots.parent / "posthoc", run / "posthoc")
    source = "posthoc" if kind == "profile" else "snapshots"
    path = run / source / "step_0000003.safetensors"
    name = poisoned(path, path, kind)
    expected = f"step_0000003.safetensors: {re.escape(name)} holds NaN or infinite values"
    if kind in ("snapshot", "profile"):
        cfg = avg_config(run / "snapshots", tiny_data_dir, tmp_path, methods="ema,phema",
                         phema_source="profiles" if kind == "profile" else "snapshots")
        with pytest.raises(CheckpointError, match=expected):
            average.average(cfg)
        assert not (tmp_path / "avg" / "results.csv").exists()
    elif kind == "init_from":
        cfg = TrainConfig(data_dir=str(tiny_data_dir), out_dir=str(tmp_path / "branch"),
                          init_from=str(path), max_iters=8, eval_iters=2, batch_size=4,
                          warmup_iters=1, device="cpu", averaging="")
        with pytest.raises(CheckpointError, match=expected):
            train.train(cfg)
        assert not (tmp_path / "branch").exists()
    else:
        with pytest.raises(CheckpointError, match=expected):
            eval_ckpt.evaluate(EvalConfig(ckpt=str(path), data_dir=str(tiny_data_dir),
                                          eval_iters=1, batch_size=4, device="cpu"))


@pytest.mark.parametrize("kind", ["snapshot", "profile", "resume"])
def test_a_flipped_byte_is_named_where_it_is_read(kind, snapshots, tiny_data_dir, tmp_path):
    run = copy_dir(snapshots, tmp_path / "run" / "snapshots").parent
    copy_dir(snapshots.parent / "posthoc", run / "posthoc")
    resume = checkpoint.latest_resume(snapshots.parent)
    (run / resume.name).write_bytes(resume.read_bytes())
    path = {"snapshot": run / "snapshots" / "step_0000004.safetensors",
            "profile": run / "posthoc" / "step_0000004.safetensors",
            "resume": run / resume.name}[kind]
    record = (checkpoint.read_posthoc(path).weights["sigma_rel=0.05"] if kind == "profile"
              else checkpoint.read_checkpoint(path).weights)
    blob = bytearray(path.read_bytes())
    at = blob.find(record["transformer.h.1.mlp.c_fc.weight"].numpy().tobytes()[:64])
    blob[at + 9] ^= 0x01
    path.write_bytes(bytes(blob))
    expected = f"{path.name} is corrupt: its contents do not match the checksum"
    if kind == "resume":
        with pytest.raises(CheckpointError, match=expected):
            train.train(TrainConfig(data_dir=str(tiny_data_dir), out_dir=str(run),
                                    init_from="resume", max_iters=8, eval_iters=2, batch_size=4,
                                    warmup_iters=1, device="cpu", averaging=""))
        return
    cfg = avg_config(run / "snapshots", tiny_data_dir, tmp_path, methods="ema,phema",
                     phema_source="profiles" if kind == "profile" else "snapshots")
    with pytest.raises(CheckpointError, match=expected):
        average.average(cfg)


# ---------------------------------------------------------------------------------------------
# 7a. average.py's out_dir: a lock, one result set, refusal of another analysis

def test_a_second_analysis_is_refused_unless_overwrite_which_replaces_the_set_as_one(
        snapshots, tiny_data_dir, tmp_path):
    """A second analysis into the same out_dir used to replace results.csv/json and the plot
    silently and leave the first one's saved/ files beside them."""
    first = avg_config(snapshots, tiny_data_dir, tmp_path, methods="ema", save="ema", plot=True)
    average.average(first)
    out = tmp_path / "avg"
    before = files_under(out)
    assert {"results.csv", "results.json", "plot.png"} <= {p.name for p in before}
    second = avg_config(snapshots, tiny_data_dir, tmp_path, methods="swa", save="swa")
    with pytest.raises(run_dir.OutDirError, match="avg holds the results of another analysis "
                                                  "\\(results.json, results.csv, plot.png, "
                                                  "saved\\); --overwrite=True replaces them"):
        average.average(second)
    assert files_under(out) == before
    summary = average.average(dataclasses.replace(second, overwrite=True))
    after = files_under(out)
    assert {p.parts[0] for p in after} == {"results.csv", "results.json", "saved"}   # no plot
    assert {p.parts[1] for p in after if p.parts[0] == "saved"} == {"swa"}   # ema's removed
    assert json.loads(after[Path("results.json")])["config"]["methods"] == "swa"
    assert "swa" in after[Path("results.csv")].decode() and \
        "ema" not in after[Path("results.csv")].decode()
    assert summary["saved"]["path"] == str(out / "saved" / "swa" / "step_0000006.safetensors")
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_a_failed_analysis_leaves_the_previous_set_whole(snapshots, tiny_data_dir, tmp_path,
                                                        monkeypatch):
    cfg = avg_config(snapshots, tiny_data_dir, tmp_path, save="ema")
    average.average(cfg)
    before = files_under(tmp_path / "avg")
    monkeypatch.setattr(offline_averaging, "plot", lambda *a: (_ for _ in ()).throw(
        RuntimeError("the plot failed")))
    with pytest.raises(RuntimeError, match="the plot failed"):
        average.average(dataclasses.replace(cfg, overwrite=True, plot=True, methods="swa",
                                            save="swa"))
    assert files_under(tmp_path / "avg") == before
    assert not [p for p in (tmp_path / "avg").iterdir() if ".tmp" in p.name]


def test_an_analysis_into_a_busy_out_dir_stops_at_once(snapshots, tiny_data_dir, tmp_path):
    cfg = avg_config(snapshots, tiny_data_dir, tmp_path)
    with run_dir.OutDirLock(cfg.out_dir):
        with pytest.raises(run_dir.OutDirError, match="in use by another run"):
            average.average(cfg)
    assert [p.name for p in Path(cfg.out_dir).iterdir()] == [".lock"]


def test_two_analyses_started_at_once_write_one_set(snapshots, tiny_data_dir, tmp_path):
    """1 of 8 such trials used to end with results.csv of one and results.json of the other."""
    out = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "average.py", f"--ckpt_dir={snapshots}",
                               f"--out_dir={out}", f"--data_dir={tiny_data_dir}",
                               f"--methods={method}", "--eval_iters=1", "--batch_size=4",
                               "--device=cpu", "--plot=False"], cwd=REPO, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for method in ("ema", "swa")]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert sorted(code for _, _, code in results) == [0, 2], results
    loser = next(err for _, err, code in results if code == 2)
    assert "in use by another run" in loser or "holds the results of another analysis" in loser
    method = json.loads((out / "results.json").read_text())["config"]["methods"]
    other = "swa" if method == "ema" else "ema"
    csv_text = (out / "results.csv").read_text()
    assert method in csv_text and other not in csv_text


def test_save_best_ignores_non_finite_losses_and_nothing_non_finite_is_written(
        snapshots, tiny_data_dir, tmp_path, monkeypatch):
    real = offline_averaging.evaluate_loss
    calls = {"n": 0}

    def ema_05_diverges(*args, **kwargs):   # per step: raw, ema[0.5], ema[0.9]
        calls["n"] += 1
        losses = real(*args, **kwargs)
        return {**losses, "val": math.nan} if calls["n"] % 3 == 2 else losses
    monkeypatch.setattr(offline_averaging, "evaluate_loss", ema_05_diverges)
    # one evaluation per setting and step (no held-out batches), so the calls go in threes
    cfg = avg_config(snapshots, tiny_data_dir, tmp_path, ema_decay=[0.5, 0.9], save="best",
                     select_iters=0)
    summary = average.average(cfg)
    assert summary["saved"]["label"] == "ema[ema_decay=0.9]"
    assert [b["setting"] for b in summary["best"]] == ["raw", "ema[ema_decay=0.9]"]
    with pytest.raises(ConfigError, match="save='ema\\[ema_decay=0.5\\]': the loss of "
                                          "ema\\[ema_decay=0.5\\] at step 6 is nan; nothing"):
        average.average(dataclasses.replace(cfg, save="ema[ema_decay=0.5]", overwrite=True))
    real_check = offline_averaging.integrity.all_finite
    monkeypatch.setattr(offline_averaging.integrity, "all_finite", lambda tensors: not any(
        isinstance(t, torch.nn.Parameter) for t in tensors) and real_check(tensors))   # weights
    with pytest.raises(CheckpointError, match="the ema\\[ema_decay=0.9\\] average at step 6 is "
                                              "not finite; nothing is saved"):
        average.average(dataclasses.replace(cfg, out_dir=str(tmp_path / "other")))
    assert not (tmp_path / "other" / "results.json").exists()
    assert not list((tmp_path / "other").rglob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# 7b. run identity: every file says which run wrote it; average.py does not mix runs

def run_ids(out_dir):
    """{file name relative to out_dir: its run record} of every file a run writes."""
    out_dir = Path(out_dir)
    found = {"config.json": json.loads((out_dir / "config.json").read_text())["run"]}
    for path in checkpoint.list_resume_checkpoints(out_dir):
        found[path.name] = checkpoint.read_checkpoint(path).run
    for sub in ("snapshots", "averaged/ema"):
        for path in checkpoint.list_snapshots(out_dir / sub):
            found[f"{sub}/{path.name}"] = checkpoint.read_checkpoint(path, tensors=False).run
    for path in checkpoint.list_snapshots(out_dir / "posthoc"):
        found[f"posthoc/{path.name}"] = checkpoint.read_posthoc(path, tensors=False).run
    return found


def test_every_file_records_its_run_a_resume_keeps_it_and_a_branch_names_its_parent(
        make_config, tmp_path):
    a = make_config(out_dir=str(tmp_path / "a"), max_iters=8, stop_iter=4, snapshot_interval=2,
                    save_averaged=True, averaging="ema", ema_update_after=0)
    train.train(a)
    train.train(dataclasses.replace(a, init_from="resume", stop_iter=None))
    ids = run_ids(a.out_dir)
    assert {"ckpt_0000008.pt", "snapshots/step_0000006.safetensors",
            "averaged/ema/step_0000006.safetensors",
            "posthoc/step_0000006.safetensors"} <= set(ids)
    (run,) = {json.dumps(r, sort_keys=True) for r in ids.values()}   # one, across the resume
    assert json.loads(run)["parent"] is None and len(json.loads(run)["id"]) == 12
    branch = make_config(out_dir=str(tmp_path / "b"), max_iters=8, snapshot_interval=2,
                         init_from=str(tmp_path / "a" / "ckpt_0000004.pt"), averaging="")
    train.train(branch)
    (child,) = {json.dumps(r, sort_keys=True) for r in run_ids(branch.out_dir).values()}
    child = json.loads(child)
    assert child["id"] != json.loads(run)["id"]
    assert child["parent"] == {"id": json.loads(run)["id"], "step": 4}


def test_files_from_before_run_ids_and_checksums_still_work(make_config, tmp_path):
    """A resume checkpoint and snapshots without `run` and `checksum` (written before them):
    the run resumes (as a new id, said in its first line) and average.py takes the old
    snapshots with the new ones."""
    cfg = make_config(max_iters=8, stop_iter=4, snapshot_interval=2)
    train.train(cfg)
    out = Path(cfg.out_dir)
    path = checkpoint.latest_resume(out)
    old = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in old.items() if k not in ("run", "checksum")}, path)
    for snapshot in checkpoint.list_snapshots(out / "snapshots"):
        metadata = safe_open(snapshot, "pt").metadata()
        save_file(load_file(snapshot), snapshot,
                  metadata={k: v for k, v in metadata.items() if k not in ("run", "checksum")})
    assert checkpoint.read_checkpoint(path).run is None
    train.train(make_config(max_iters=8, snapshot_interval=2, init_from="resume"))
    ids = {checkpoint.read_checkpoint(p, tensors=False).run is None
           for p in checkpoint.list_snapshots(out / "snapshots")}
    assert ids == {True, False}   # steps 0..4 without an id, 6 and 8 with the new one
    summary = average.average(AverageConfig(ckpt_dir=str(out / "snapshots"),
                                            out_dir=str(tmp_path / "avg"), data_dir=cfg.data_dir,
                                            eval_iters=1, batch_size=4, device="cpu",
                                            methods="ema", plot=False))
    assert sorted({r["step"] for r in summary["rows"]}) == [0, 2, 4, 6, 8]


@pytest.fixture(scope="module")
def other_run(tiny_data_dir, tmp_path_factory):
    """A run of the `snapshots` fixture's shape with another seed: snapshots and profiles 0..8."""
    out = tmp_path_factory.mktemp("other")
    train.train(TrainConfig(data_dir=str(tiny_data_dir), out_dir=str(out), n_layer=2, n_head=2,
                            n_embd=32, block_size=16, batch_size=4, max_iters=8, eval_interval=8,
                            eval_iters=2, log_interval=8, ckpt_interval=8, warmup_iters=1,
                            device="cpu", snapshot_interval=1, averaging="", seed=7))
    return out


def test_a_snapshot_of_another_run_is_refused_naming_both(snapshots, other_run, tiny_data_dir,
                                                          tmp_path):
    """It used to be averaged in without a word."""
    directory = copy_dir(snapshots, tmp_path / "in")
    stray = other_run / "snapshots" / "step_0000008.safetensors"
    (directory / stray.name).write_bytes(stray.read_bytes())
    ours = checkpoint.read_checkpoint(snapshots / "step_0000006.safetensors", tensors=False).run
    theirs = checkpoint.read_checkpoint(stray, tensors=False).run
    with pytest.raises(CheckpointError, match=f"mixes the files of two runs: "
                                              f"step_0000006.safetensors \\(step 6\\) is run "
                                              f"{ours['id']}, step_0000008.safetensors "
                                              f"\\(step 8\\) is run {theirs['id']}.*"
                                              f"--mix_runs=True"):
        average.average(avg_config(directory, tiny_data_dir, tmp_path))
    with pytest.warns(UserWarning, match=f"is a file of run {theirs['id']}"):
        summary = average.average(avg_config(directory, tiny_data_dir, tmp_path, skip_bad=True,
                                             overwrite=True))
    assert [s["file"] for s in summary["skipped"]] == [stray.name]
    mixed = average.average(avg_config(directory, tiny_data_dir, tmp_path, mix_runs=True,
                                       overwrite=True))
    assert max(r["step"] for r in mixed["rows"]) == 8


@pytest.mark.parametrize("how", ["replaced", "posthoc_dir"])
def test_profiles_of_another_run_are_refused_naming_both(how, snapshots, other_run,
                                                         tiny_data_dir, tmp_path):
    """They used to move the reconstructed phema's loss while the profile error looked fine."""
    run = copy_dir(snapshots, tmp_path / "run" / "snapshots").parent
    theirs = other_run / "posthoc"
    if how == "replaced":
        copy_dir(theirs, run / "posthoc")
        extra = {}
    else:
        extra = {"posthoc_dir": str(theirs)}
    cfg = avg_config(run / "snapshots", tiny_data_dir, tmp_path, methods="phema",
                     phema_source="profiles", **extra)
    other_id = checkpoint.read_posthoc(theirs / "step_0000001.safetensors", tensors=False).run
    with pytest.raises(ConfigError, match=f"with the post-hoc profiles in .* mixes the files of "
                                          f"two runs: .* is run .*{other_id['id']}"):
        average.average(cfg)


def test_a_branch_joins_its_parent_where_it_branched(snapshots, tiny_data_dir, tmp_path):
    """A cooldown branched off step 4 of a run: the run's files up to 4 and the branch's after
    it are one trajectory; a file of the run after the branch point is not."""
    branch = tmp_path / "branch"
    train.train(TrainConfig(data_dir=str(tiny_data_dir), out_dir=str(branch), n_layer=2,
                            n_head=2, n_embd=32, block_size=16, batch_size=4, max_iters=8,
                            eval_interval=8, eval_iters=2, log_interval=8, ckpt_interval=8,
                            warmup_iters=1, device="cpu", snapshot_interval=1, averaging="",
                            posthoc_sigma_rel=None,
                            init_from=str(snapshots / "step_0000004.safetensors")))
    joined = tmp_path / "joined"
    joined.mkdir()
    for step in range(5):
        name = f"step_{step:07d}.safetensors"
        (joined / name).write_bytes((snapshots / name).read_bytes())
    for path in checkpoint.list_snapshots(branch / "snapshots"):
        (joined / path.name).write_bytes(path.read_bytes())
    summary = average.average(avg_config(joined, tiny_data_dir, tmp_path))
    assert sorted({r["step"] for r in summary["rows"]}) == list(range(9))
    (joined / "step_0000006.safetensors").write_bytes(
        (snapshots / "step_0000006.safetensors").read_bytes())   # the parent went on past 4
    with pytest.raises(CheckpointError, match="step_0000006.safetensors \\(step 6\\) is run "
                                              ".* a branch of run .* at step 4"):
        average.average(avg_config(joined, tiny_data_dir, tmp_path, overwrite=True,
                                   skip_bad=False))


# ---------------------------------------------------------------------------------------------
# 8. every bad input names its culprit

def prepared(tmp_path, tiny_data_dir, name="data"):
    directory = tmp_path / name
    directory.mkdir()
    for f in ("train.bin", "val.bin", "meta.json"):
        (directory / f).write_bytes((tiny_data_dir / f).read_bytes())
    return directory


@pytest.mark.parametrize("damage, phrase", [
    ("odd", "train.bin has 30001 bytes, not a whole"),
    ("empty", "val.bin has 0 bytes"),
    ("list", "meta.json holds a JSON list, not an object"),
    ("big id", "holds token id 60000, outside its vocabulary of 21"),
    ("float dtype", "dtype='float32' is not supported"),
    ("vocab", "vocab_size='21' must be a positive integer"),
])
def test_bad_data_files_are_named(damage, phrase, tiny_data_dir, tmp_path):
    d = prepared(tmp_path, tiny_data_dir)
    meta = json.loads((d / "meta.json").read_text())
    meta.pop("train_tokens"), meta.pop("val_tokens")
    if damage == "odd":
        (d / "train.bin").write_bytes(b"\0" * 30001)
    elif damage == "empty":
        (d / "val.bin").write_bytes(b"")
    elif damage == "list":
        meta = [meta]
    elif damage == "big id":
        ids = np.fromfile(d / "train.bin", dtype=np.uint16)
        ids[17] = 60000
        ids.tofile(d / "train.bin")
    elif damage == "float dtype":
        meta["dtype"] = "float32"
    elif damage == "vocab":
        meta["vocab_size"] = "21"
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=phrase):
        TokenDataset(d)


def test_meta_json_dtype_is_honoured(tiny_data_dir, tmp_path):
    d = prepared(tmp_path, tiny_data_dir)
    for split in ("train", "val"):
        ids = np.fromfile(d / f"{split}.bin", dtype=np.uint16)
        ids.astype(np.uint32).tofile(d / f"{split}.bin")
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "dtype": "uint32"}))
    wide = TokenDataset(d)
    narrow = TokenDataset(tiny_data_dir)
    assert wide.splits["train"].dtype == np.uint32
    assert np.array_equal(np.asarray(wide.splits["val"]), np.asarray(narrow.splits["val"]))


@pytest.mark.parametrize("arg, phrase", [
    ("--seed=-1", "seed=-1 must be >= 0"), ("--beta1=1.5", "beta1=1.5 must be in [0, 1)"),
    ("--device=tpu", "device='tpu' is unknown"), ("--weight_decay=-1", "weight_decay=-1"),
    ("--learning_rate=1e999", "learning_rate=inf must be a finite"),
    ("--learning_rate=inf", "learning_rate must be a float"),
    ("--out_dir=", "out_dir is empty"), ("--dropout=1.0", "dropout=1.0 must be in"),
])
def test_impossible_values_are_config_errors(arg, phrase):
    with pytest.raises(ConfigError, match=re.escape(phrase)):
        load_config(TrainConfig, [arg])


def test_a_directory_given_as_a_checkpoint_is_named_as_one(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint"):
        checkpoint.read_checkpoint(tmp_path)


def one_line_error(entry, argv, capsys):
    """Run a command's main() in-process as its script does; the one line it printed."""
    config_cls, run = entry
    with pytest.raises(SystemExit) as exit:
        main(config_cls, run, "", argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


TRAIN, BENCH, AVERAGE = ((TrainConfig, train.train), (BenchConfig, measure_throughput),
                         (AverageConfig, average.average))


@pytest.mark.parametrize("entry, args, phrase", [
    (TRAIN, ["--n_embd=33", "--n_head=2"], "n_embd=33 is not a multiple of n_head=2"),
    (BENCH, ["--n_embd=33", "--n_head=2"], "n_embd=33 is not a multiple of n_head=2"),
    (TRAIN, ["--seed=18446744073709551616"], "seed = 18446744073709551616 in --seed="),
    (TRAIN, ["--seed=2**64"], "seed = '2**64' (str)"),
    (TRAIN, ["--max_iters=1" + "0" * 3999], "max_iters = 100000000000... (4000 digits)"),
    (AVERAGE, ["--ckpt_dir=x", "--posthoc_profiles=[]"], "posthoc_profiles=[] selects no"),
])
def test_impossible_numbers_are_one_line_before_anything_is_written(entry, args, phrase, capsys,
                                                                    tmp_path):
    line = one_line_error(entry, args + [f"--out_dir={tmp_path / 'out'}"], capsys)
    assert phrase in line
    assert not (tmp_path / "out").exists()


def test_an_architecture_error_under_torchrun_is_one_line(tiny_data_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "train.py", "--n_embd=33", "--n_head=2",
                             "--device=cpu", f"--data_dir={tiny_data_dir}",
                             f"--out_dir={tmp_path / 'out'}"],
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if "n_embd=33" in line]
    assert lines == ["error: n_embd=33 is not a multiple of n_head=2: each head gets n_embd / "
                     "n_head channels; e.g. --n_head=1"], result.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def mounted_tmpfs(mount, options):
    """A 1 MiB tmpfs at `mount` with mount `options` where the test may mount one (root on
    Linux), else None; unmounted when the test ends."""
    mount.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options}size=1m", "tmpfs", str(mount)],
                        capture_output=True).returncode == 0 if os.geteuid() == 0 else False
    yield mount if ok else None
    if ok:
        subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs where the test may mount one, else None."""
    yield from mounted_tmpfs(tmp_path / "ro", "ro,")


OUT_DIR_CASES = [
    ("read-only", "could not write .*/ro/run/.lock: .*Read-only file system.*Check that the "
                  "folder is writable"),
    ("a file", "out_dir .*/run is a file, not a folder; choose another --out_dir"),
    ("under a file", "out_dir .*/run/sub is under .*/run, which is a file, not a folder"),
    (".lock a folder", "run/.lock is a folder, but it is where a run keeps its lock file"),
]


@pytest.mark.parametrize("entry, case, phrase", [
    *[pytest.param(entry, case, phrase, id=f"{name}-{case}") for name, entry in
      (("train", TRAIN), ("average", AVERAGE)) for case, phrase in OUT_DIR_CASES],
    # average.py keeps no metrics.jsonl: this one is train.py's alone
    pytest.param(TRAIN, "metrics.jsonl a folder", "run/metrics.jsonl is not a file",
                 id="train-metrics.jsonl a folder"),
])
def test_an_unusable_out_dir_is_one_line(case, phrase, entry, make_config, read_only_dir,
                                         tmp_path, tiny_data_dir, capsys, monkeypatch):
    out = tmp_path / "run"
    if case == "read-only":
        if read_only_dir is None:   # no mount allowed: the error the file system would give
            real_open = os.open
            monkeypatch.setattr(os, "open", lambda path, *a: real_open(path, *a) if
                                not str(path).endswith(".lock") else
                                (_ for _ in ()).throw(OSError(30, "Read-only file system")))
            read_only_dir = tmp_path / "ro"
        out = read_only_dir / "run"
    elif case == "a file":
        out.write_text("notes")
    elif case == "under a file":
        out.write_text("notes")
        out = out / "sub"
    elif case == ".lock a folder":
        (out / ".lock").mkdir(parents=True)
    else:   # metrics.jsonl a folder, in a run to resume
        train.train(make_config(out_dir=str(out), max_iters=4, lawa_interval=100))
        (out / "metrics.jsonl").unlink()
        (out / "metrics.jsonl").mkdir()
    args = [f"--data_dir={tiny_data_dir}", f"--out_dir={out}", "--device=cpu"]
    if entry is TRAIN:
        args += TINY + ["--max_iters=4", "--warmup_iters=1"]
        args += ["--init_from=resume"] if case == "metrics.jsonl a folder" else []
    else:
        args += [f"--ckpt_dir={tmp_path / 'traj'}"]
        traj = tmp_path / "traj"
        traj.mkdir()
        model_args = dict(block_size=16, vocab_size=21, n_layer=1, n_head=2, n_embd=16)
        for step in (0, 1):
            checkpoint.save_snapshot(traj, GPT(GPTConfig(**model_args)), step, 0, model_args)
    assert re.search(phrase, one_line_error(entry, args, capsys))


def test_a_checkpoint_with_a_negative_step_is_one_line(make_config, tiny_data_dir, capsys):
    cfg = make_config(max_iters=4, lawa_interval=100)
    train.train(cfg)
    path = checkpoint.latest_resume(cfg.out_dir)
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "iter_num": -3, "checksum": None}, path)
    with pytest.raises(CheckpointError, match="ckpt_0000004.pt: its step is -3"):
        checkpoint.read_checkpoint(path)
    line = one_line_error(TRAIN, [f"--data_dir={tiny_data_dir}", f"--out_dir={cfg.out_dir}",
                                  "--init_from=resume", "--max_iters=8", *TINY], capsys)
    assert "ckpt_0000004.pt: its step is -3" in line


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs where the test may mount one, else None."""
    yield from mounted_tmpfs(tmp_path / "disk", "")


def test_a_full_disk_is_one_clear_error_and_the_previous_checkpoint_survives(
        make_config, tmp_path, small_disk, monkeypatch):
    if small_disk is not None:   # a real ENOSPC: the kept checkpoints (~0.4 MiB each) outgrow it
        cfg = make_config(out_dir=str(small_disk / "run"), max_iters=40, ckpt_interval=1,
                          keep_last=0, averaging="", log_interval=100, eval_interval=100)
        # past train.py's check at start (which refuses this run), as a disk that others fill
        monkeypatch.setattr(run_dir, "free_space", lambda path: None)
    else:   # no mount allowed: the same error, injected into the second checkpoint write
        cfg = make_config(max_iters=8, ckpt_interval=1, keep_last=1, averaging="")
        real_save = torch.save
        calls = {"n": 0}

        def save_then_fail(obj, f):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(28, "No space left on device")
            real_save(obj, f)
        monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(WriteError, match="could not write .*ckpt_\\d+\\.pt: no space "
                                                    "left on the device.*the newest resume "
                                                    "checkpoint is"):
        train.train(cfg)
    monkeypatch.undo()
    steps = all_files_load(cfg.out_dir)
    assert steps, "the checkpoint written before the disk filled is there and loads"
    assert not [p for p in Path(cfg.out_dir).iterdir() if ".tmp" in p.name]


# ---------------------------------------------------------------------------------------------
# 9. wandb: one run per out_dir

def wandb_env(tmp_path, mode="offline"):
    """The real wandb client with no network, no login and nothing written outside tmp_path."""
    variables = {k: v for k, v in env().items() if not k.startswith("WANDB_") and k != "NETRC"}
    home = tmp_path / "home"
    return {**variables, "WANDB_MODE": mode, "HOME": str(home),
            **{f"WANDB_{name}_DIR": str(home / name.lower())
               for name in ("CONFIG", "CACHE", "DATA", "ARTIFACT")}}


def wandb_records(path):
    """(run id, history rows) of an offline run's .wandb file: W&B's protobuf Records in LevelDB's
    log framing (blocks of 32 KiB, each piece led by crc32, length, type), after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    run_id, rows, pos, pieces = None, [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:             # a block's tail too short for a header: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:                            # zero fill to the end of the block
            pos += block - pos % block
            continue
        pieces, pos = pieces + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):                       # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record.FromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "run":
                run_id = record.run.run_id
            elif record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return run_id, rows


def train_command(out, data_dir, *args):
    return [sys.executable, "train.py", f"--out_dir={out}", f"--data_dir={data_dir}",
            "--wandb_log=True", "--max_iters=8", "--eval_interval=4", "--log_interval=2",
            "--ckpt_interval=4", "--averaging=ema", *TINY, *args]


def test_wandb_offline_stop_and_resume_log_to_one_run_under_out_dir(tiny_data_dir, tmp_path):
    """The real wandb client (WANDB_MODE=offline): a run stopped at stop_iter and resumed is ONE
    W&B run (same id, kept in out_dir/wandb_run_id), its files under out_dir/wandb, and it holds
    what metrics.jsonl holds, at the same steps."""
    pytest.importorskip("wandb", reason="pip install -r requirements-extra.txt")
    out = tmp_path / "run"
    for extra in (["--stop_iter=4"], ["--init_from=resume"]):
        result = subprocess.run(train_command(out, tiny_data_dir, *extra), cwd=REPO,
                                env=wandb_env(tmp_path), capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
    run_id = (out / "wandb_run_id").read_text().strip()
    invocations = sorted((out / "wandb").glob("offline-run-*"))
    assert [p.name.rsplit("-", 1)[1] for p in invocations] == [run_id, run_id]
    assert not list((tmp_path / "home").rglob("offline-run-*"))   # nothing outside out_dir

    logged = {}
    for invocation in invocations:
        logged_id, rows = wandb_records(invocation / f"run-{run_id}.wandb")
        assert logged_id == run_id
        for row in rows:
            logged.update({(row["_step"], k): v for k, v in row.items() if not k.startswith("_")})
    expected = {(r["iter"], k): v for r in run_dir.read_metrics(out / "metrics.jsonl")
                for k, v in r.items()}
    assert {step for step, _ in expected} == {0, 2, 4, 6, 8}
    assert logged == expected


def test_a_failing_wandb_init_is_one_line_and_leaves_out_dir_usable(tiny_data_dir, tmp_path):
    """wandb.init failing at start-up (here: online mode without a login) stops the run with one
    line naming the fixes, before anything is written: the same command then runs (offline)
    without deleting anything."""
    pytest.importorskip("wandb", reason="pip install -r requirements-extra.txt")
    out = tmp_path / "run"
    failed = subprocess.run(train_command(out, tiny_data_dir), cwd=REPO,
                            env=wandb_env(tmp_path, mode="online"), capture_output=True,
                            text=True, timeout=300)
    assert failed.returncode == 2, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: wandb_log=True but wandb.init failed")
    assert "wandb login" in lines[0] and "WANDB_MODE=offline" in lines[0], lines[0]
    assert "--wandb_log=False" in lines[0]
    assert [p.name for p in out.iterdir()] == [run_dir.LOCK_NAME]   # nothing else written
    rerun = subprocess.run(train_command(out, tiny_data_dir), cwd=REPO, env=wandb_env(tmp_path),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "config.json").is_file() and (out / run_dir.WANDB_ID_NAME).is_file()


# ---------------------------------------------------------------------------------------------
# fault injection: kill -9 at random points of the writes

def test_kill_9_at_random_points_leaves_every_file_loadable_and_resumable(tiny_data_dir,
                                                                          tmp_path):
    """A checkpoint, a snapshot and a metrics line at every step, so most of the time is spent
    writing; each trial kills the run at a random moment, then checks every file and resumes.
    WA_FAULT_TRIALS sets the number of trials (docs/reliability.md reports a long campaign)."""
    out = tmp_path / "run"
    rng = random.Random(int(os.environ.get("WA_FAULT_SEED", "0")))
    common = [f"--out_dir={out}", f"--data_dir={tiny_data_dir}", "--log_interval=1",
              "--ckpt_interval=1", "--snapshot_interval=1", "--keep_last=2",
              "--eval_interval=100000", "--averaging=ema,lawa", "--lawa_interval=2", *TINY]
    killed_mid_write = {"checkpoint": 0, "snapshot": 0, "profile": 0, "log": 0}
    for trial in range(FAULT_TRIALS):
        start = ["--init_from=resume"] if checkpoint.latest_resume(out) else []
        # far more steps than a trial reaches, but not so many that the disk plan (a snapshot
        # and a profile per step) exceeds a small disk: 100000 steps would plan 29 GiB
        proc = subprocess.Popen([sys.executable, "train.py",
                                 f"--max_iters={1000 * (FAULT_TRIALS + 1)}", *start, *common],
                                cwd=REPO, env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith("iter "):
                break
        deadline = time.monotonic() + 120   # a loaded machine can take seconds to the first save
        while (checkpoint.latest_resume(out) is None and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert proc.poll() is None, f"trial {trial}: train.py stopped before the kill: " \
                                    f"{proc.stderr.read()[-2000:]}"
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.communicate(timeout=60)
        for p in out.rglob(".*.tmp*"):
            kind = {"snapshots": "snapshot", "posthoc": "profile"}.get(p.parent.name)
            killed_mid_write[kind or ("checkpoint" if ".ckpt_" in p.name else "log")] += 1
        steps = all_files_load(out)
        assert steps, f"trial {trial}: no loadable resume checkpoint"
    last = max(all_files_load(out))
    done = subprocess.run([sys.executable, "train.py", f"--max_iters={last + 3}",
                           "--init_from=resume", *common], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not any(".tmp" in p.name for p in out.rglob("*"))
    records = run_dir.read_metrics(out / "metrics.jsonl")
    assert [r["iter"] for r in records if "loss" in r] == list(range(1, last + 4))
    # one timeline of one run: a snapshot and a profile per step, the abandoned ones aside
    steps = {sub: [checkpoint.read_checkpoint(p, tensors=False).step if sub == "snapshots" else
                   checkpoint.read_posthoc(p, tensors=False).step
                   for p in checkpoint.list_snapshots(out / sub)]
             for sub in ("snapshots", "posthoc")}
    assert steps == {"snapshots": list(range(0, last + 4)), "posthoc": list(range(1, last + 4))}
    ids = {checkpoint.read_checkpoint(p, tensors=False).run["id"]
           for p in checkpoint.list_snapshots(out / "snapshots")}
    assert len(ids) == 1
    aside = list((out / "abandoned").rglob("*.safetensors"))   # empty if there is none
    print(f"kill -9 trials: {FAULT_TRIALS}, killed during a write (temporary left): "
          f"{killed_mid_write}, files of abandoned timelines set aside: {len(aside)}")


def test_kill_9_of_average_py_leaves_no_result_set_or_a_whole_one(snapshots, tiny_data_dir,
                                                                  tmp_path):
    """average.py --save killed at random moments, the analyses alternating between two method
    lists into one out_dir with --overwrite=True: after every kill out_dir holds no result set
    or one whole set of one analysis (results.csv, results.json and the saved file agree, and
    the file loads), and the next analysis takes the lock over and cleans up."""
    out = tmp_path / "avg"
    rng = random.Random(int(os.environ.get("WA_FAULT_SEED", "0")))
    counts = {"no set": 0, "whole set": 0, "of the killed analysis": 0, "staging left": 0}

    def command(methods):
        return [sys.executable, "average.py", f"--ckpt_dir={snapshots}", f"--out_dir={out}",
                f"--data_dir={tiny_data_dir}", f"--methods={methods}", "--eval_iters=1",
                "--batch_size=4", "--device=cpu", "--save=best", "--overwrite=True"]
    start = time.perf_counter()
    done = subprocess.run(command("ema"), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    duration = time.perf_counter() - start
    for trial in range(FAULT_TRIALS):
        methods = ("swa,lawa", "ema")[trial % 2]
        before = (out / "results.json").read_bytes()
        proc = subprocess.Popen(command(methods), cwd=REPO, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.1 * duration))
        proc.kill()
        proc.wait(timeout=60)
        counts["staging left"] += any(".tmp" in p.name for p in out.iterdir())
        record = out / "results.json"
        if not record.exists():
            counts["no set"] += 1
            assert not (out / "results.csv").exists() and not (out / "saved").exists()
            continue
        counts["whole set"] += 1
        counts["of the killed analysis"] += record.read_bytes() != before   # it had committed
        result = json.loads(record.read_text())
        methods_run = set(result["config"]["methods"].split(","))
        rows = (out / "results.csv").read_text().splitlines()[1:]
        assert {row.split(",")[2] for row in rows} == methods_run | {"raw"}
        saved = Path(result["saved"]["path"])
        assert saved.parent.parent == out / "saved" and len(list((out / "saved").iterdir())) == 1
        assert checkpoint.read_checkpoint(saved).averager in methods_run
    done = subprocess.run(command("ema"), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    print(f"average.py kill -9 trials: {FAULT_TRIALS}, {counts}")
