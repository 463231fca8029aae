"""A run's data is never lost, poisoned or mixed: non-finite state is never saved, an out_dir
belongs to one run, resume survives torn logs and leftover temporaries and keeps the saved
architecture, every bad input names its culprit, and kill -9 / SIGTERM / a full disk leave every
file loadable. docs/reliability.md lists what is promised and these tests."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import average
import train
from model import GPT, GPTConfig
from wagpt import checkpoint, offline_averaging, run_dir
from wagpt.configurator import load_config
from wagpt.dataloader import DataError, TokenDataset
from wagpt.errors import CheckpointError, ConfigError, WriteError
from wagpt.offline_averaging import AverageConfig
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
    dst.mkdir()
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
        average.average(cfg)


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


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs where the test may mount one (root on Linux), else None."""
    mount = tmp_path / "disk"
    mount.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                        capture_output=True).returncode == 0 if os.geteuid() == 0 else False
    yield mount if ok else None
    if ok:
        subprocess.run(["umount", str(mount)], capture_output=True)


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

def test_wandb_resumes_one_run_per_out_dir_with_files_under_it(make_config, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.util = types.SimpleNamespace(generate_id=lambda: f"id{len(calls)}")

    class Run:
        def log(self, record, step):
            pass
    fake.init = lambda **kw: calls.append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = make_config(wandb_log=True, max_iters=8, stop_iter=4)
    train.train(cfg)
    train.train(make_config(wandb_log=True, max_iters=8, init_from="resume"))
    assert [c["id"] for c in calls] == ["id0", "id0"]
    assert all(c["resume"] == "allow" and c["dir"] == cfg.out_dir for c in calls)
    assert (Path(cfg.out_dir) / "wandb_run_id").read_text().strip() == "id0"


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
    killed_mid_write = 0
    for trial in range(FAULT_TRIALS):
        start = ["--init_from=resume"] if checkpoint.latest_resume(out) else []
        proc = subprocess.Popen([sys.executable, "train.py", "--max_iters=100000", *start,
                                 *common], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith("iter "):
                break
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.communicate(timeout=60)
        killed_mid_write += any(".tmp" in p.name for p in out.rglob("*"))
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
    print(f"kill -9 trials: {FAULT_TRIALS}, killed during a write: {killed_mid_write}")
