"""Every tool that reads a checkpoint takes the data (and the tokenizer) it was trained on from
the checkpoint unless told otherwise, and refuses data of another vocabulary in one line:
eval_ckpt.py, average.py, sample.py, export_hf.py, and train.py resuming or branching."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_char_dataset

import average
import eval_ckpt
import export_hf
import sample
import train
from model import GPT, GPTConfig
from wagpt import checkpoint
from wagpt.configurator import load_config
from wagpt.dataloader import DataError
from wagpt.offline_averaging import AverageConfig
from wagpt.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models

REPO = Path(__file__).resolve().parent.parent
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, eval_iters=2,
            warmup_iters=2, learning_rate=1e-2, min_lr=1e-3, device="cpu", averaging="ema")


@pytest.fixture(scope="module")
def run_dir(tiny_data_dir, tmp_path_factory):
    """A tiny run on tiny_data_dir with snapshots: every file it writes records that data."""
    out = tmp_path_factory.mktemp("run") / "run"
    train.train(TrainConfig(data_dir=str(tiny_data_dir), out_dir=str(out), max_iters=4,
                            eval_interval=4, ckpt_interval=4, log_interval=2,
                            snapshot_interval=2, save_averaged=True, **TINY))
    return out


@pytest.fixture(scope="module")
def other_chars(tmp_path_factory):
    """Character data of another vocabulary of the same size (other letters)."""
    data = write_char_dataset(tmp_path_factory.mktemp("other"),
                              "\n".join("ABCDEFGHIJKLMNOPQRS "[i % 20] * 5 for i in range(3000)))
    assert json.loads((data / "meta.json").read_text())["vocab_size"] == 21   # as tiny_data_dir
    return data


def test_every_file_records_its_data(run_dir, tiny_data_dir):
    meta = json.loads((tiny_data_dir / "meta.json").read_text())
    for path in [checkpoint.latest_resume(run_dir), run_dir / "snapshots/step_0000002.safetensors",
                 run_dir / "averaged/ema/step_0000004.safetensors"]:
        data = checkpoint.read_checkpoint(path, tensors=False).data
        assert data == {"dataset": "shakespeare_char", "data_dir": str(tiny_data_dir),
                        "vocab_size": meta["vocab_size"], "tokenizer": "char",
                        "chars": meta["chars"]}, path


def test_eval_ckpt_uses_the_checkpoints_data_and_refuses_another_vocabulary(
        run_dir, tiny_data_dir, other_chars):
    ckpt = str(run_dir / "snapshots/step_0000004.safetensors")
    plain = eval_ckpt.evaluate(eval_ckpt.EvalConfig(ckpt=ckpt, eval_iters=2, device="cpu",
                                                    embeddings=False))
    told = eval_ckpt.evaluate(eval_ckpt.EvalConfig(ckpt=ckpt, eval_iters=2, device="cpu",
                                                   embeddings=False,
                                                   data_dir=str(tiny_data_dir)))
    assert plain["data_dir"] == str(tiny_data_dir) and plain["val_loss"] == told["val_loss"]
    with pytest.raises(DataError, match="is not in the vocabulary of .*step_0000004"):
        eval_ckpt.evaluate(eval_ckpt.EvalConfig(ckpt=ckpt, eval_iters=2, device="cpu",
                                                data_dir=str(other_chars)))


def test_a_gpt2_bpe_model_is_not_scored_on_character_data(tiny_data_dir, tmp_path):
    """The reported surprise: a GPT-2-vocabulary checkpoint scored on character data (a
    nanoGPT-style file that records no data, with the data given, or the default)."""
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=16, dropout=0.0,
                bias=False)
    nano = tmp_path / "ckpt.pt"
    torch.save({"model": checkpoint.model_state(GPT(GPTConfig(**args))), "model_args": args,
                "iter_num": 10}, nano)
    env = {k: v for k, v in os.environ.items() if k != "WA_TRACEBACK"}
    for extra in ([f"--data_dir={tiny_data_dir}"], []):
        result = subprocess.run([sys.executable, "eval_ckpt.py", f"--ckpt={nano}",
                                 "--device=cpu", "--eval_iters=1", *extra], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
        assert "--data_dir=PATH" in lines[0], lines


def test_average_uses_the_snapshots_data(run_dir, tiny_data_dir, other_chars, tmp_path):
    common = dict(ckpt_dir=str(run_dir / "snapshots"), eval_iters=2, batch_size=4,
                  device="cpu", methods="ema", plot=False)
    plain = average.average(AverageConfig(out_dir=str(tmp_path / "a"), **common))
    told = average.average(AverageConfig(out_dir=str(tmp_path / "b"),
                                         data_dir=str(tiny_data_dir), **common))
    assert [r["val_loss"] for r in plain["rows"]] == [r["val_loss"] for r in told["rows"]]
    with pytest.raises(DataError, match="is not in the vocabulary"):
        average.average(AverageConfig(out_dir=str(tmp_path / "c"), data_dir=str(other_chars),
                                      **common))
    assert not (tmp_path / "c").exists()


def test_sample_and_export_take_the_characters_from_the_checkpoint(run_dir, tmp_path,
                                                                   other_chars):
    ckpt = str(run_dir / "snapshots/step_0000004.safetensors")
    texts = sample.sample(load_config(sample.SampleConfig, [
        f"--ckpt={ckpt}", "--prompt=to be", "--device=cpu", "--max_new_tokens=8"]))
    assert texts[0].startswith("to be")
    with pytest.raises(Exception, match="other characters"):
        sample.sample(load_config(sample.SampleConfig, [
            f"--ckpt={ckpt}", "--prompt=to be", "--device=cpu", f"--data_dir={other_chars}"]))
    out = export_hf.export(export_hf.ExportConfig(ckpt=ckpt, out_dir=str(tmp_path / "hf")))
    chars = checkpoint.read_checkpoint(ckpt, tensors=False).data["chars"]
    assert json.loads((out / "meta.json").read_text())["chars"] == chars


def test_train_resumes_and_branches_on_the_checkpoints_data(run_dir, tiny_data_dir,
                                                            other_chars, tmp_path):
    snapshot = str(run_dir / "snapshots/step_0000002.safetensors")
    branch = dict(TINY, init_from=snapshot, max_iters=4, eval_interval=4, ckpt_interval=4,
                  log_interval=2, ema_update_after=2)
    summary = train.train(TrainConfig(out_dir=str(tmp_path / "b"), **branch))   # no data given
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["data_dir"] == str(tiny_data_dir) and summary["iter_num"] == 4
    with pytest.raises(DataError, match="is not in the vocabulary"):
        train.train(TrainConfig(out_dir=str(tmp_path / "c"), data_dir=str(other_chars),
                                **branch))
    assert not (tmp_path / "c").exists()
    # a resume finds its data in the checkpoint too
    resumed = train.train(TrainConfig(out_dir=str(tmp_path / "b"),
                                      **dict(branch, init_from="resume", max_iters=6)))
    assert resumed["iter_num"] == 6


def test_a_missing_recorded_data_folder_says_where_it_came_from(run_dir, tmp_path):
    copy = tmp_path / "snap.safetensors"
    copy.write_bytes((run_dir / "snapshots/step_0000004.safetensors").read_bytes())
    record = checkpoint.read_checkpoint(copy)
    moved = dict(record.data, data_dir=str(tmp_path / "gone"))
    checkpoint.save_snapshot(tmp_path / "moved", GPT(GPTConfig(**record.model_args)), 4, 0,
                             record.model_args, extra={"data": moved})
    with pytest.raises(DataError, match=r"records .*gone: pass the data to use with --dataset"):
        eval_ckpt.evaluate(eval_ckpt.EvalConfig(
            ckpt=str(tmp_path / "moved/step_0000004.safetensors"), device="cpu"))
