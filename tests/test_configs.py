"""Every shipped config parses, and the GPT-2 124M configs start on a CPU with a tiny dataset."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train
from model import GPT, GPTConfig
from wagpt import checkpoint
from wagpt.configurator import load_config
from wagpt.dataloader import open_dataset
from wagpt.offline_averaging import AverageConfig
from wagpt.online_averaging import parse_methods
from wagpt.run_dir import disk_plan
from wagpt.runtime import init_runtime
from wagpt.trainer import (TrainConfig, build, model_args_from_config, start_averaging,
                           train_batches, train_step)

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "config").glob("*.py"))
SMALL = [p for p in CONFIGS if p.name.startswith("train_small")]


def test_the_configs_are_there():
    names = {p.name for p in CONFIGS}
    assert {"train_shakespeare_char.py", "train_small.py", "train_small_wsd.py",
            "train_small_bema.py", "train_small_ema.py", "train_small_lawa.py",
            "train_small_swa.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    # avg_*.py configure average.py, the others train.py
    cfg = load_config(AverageConfig if path.name.startswith("avg_") else TrainConfig, [str(path)])
    assert cfg.out_dir.startswith("out/")


def test_default_config_file_is_the_default():
    from_file = load_config(TrainConfig, [str(CONFIGS[0].parent / "train_shakespeare_char.py")])
    assert from_file == TrainConfig()


@pytest.mark.parametrize("path", SMALL, ids=lambda p: p.name)
def test_small_config_starts_on_cpu(path, tiny_data_dir, tmp_path):
    """Build the 124M model with the config's optimizer and averagers, take 2 steps."""
    cfg = load_config(TrainConfig, [str(path), "--device=cpu", "--max_iters=2", "--compile=False",
                                    f"--data_dir={tiny_data_dir}", f"--out_dir={tmp_path}",
                                    "--block_size=32", "--batch_size=1", "--eval_iters=1",
                                    "--gradient_accumulation_steps=1", "--warmup_iters=1"])
    runtime = init_runtime(cfg.device, cfg.dtype)
    data = open_dataset(cfg.dataset, cfg.data_dir)
    run = build(cfg, runtime, data)
    start_averaging(run, cfg)
    assert 123e6 < run.model.num_params() < 125e6
    online = run.online
    assert online.names == parse_methods(cfg.averaging)
    batches = train_batches(data, cfg, runtime, 0)
    for step in range(1, 3):
        loss = train_step(run.model, run.optimizer, batches, cfg, runtime, cfg.learning_rate)
        online.update(step)
        assert torch.isfinite(loss)
    # every averager whose burn-in has passed is averaging (BEMA's is step 2000)
    assert online.ready() == [m for m, a in online.averagers.items() if a.tau <= 2]


def test_finetune_config_starts_from_a_transformers_folder(tiny_data_dir, tmp_path):
    """config/finetune_shakespeare.py with --init_from=<a GPT-2 folder> (no hub here): the
    pretrained weights are the model and every averager's θ₀ at step 0."""
    import transformers
    hf_dir = tmp_path / "gpt2_tiny"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50257, n_positions=32, n_embd=16, n_layer=1, n_head=2,
        activation_function="gelu")).save_pretrained(hf_dir)
    bpe_data = tmp_path / "bpe_data"   # GPT-2 BPE ids: a GPT-2 model reads no other data
    bpe_data.mkdir()
    ids = np.random.default_rng(0).integers(0, 50257, size=4000, dtype=np.uint16)
    ids[:3600].tofile(bpe_data / "train.bin")
    ids[3600:].tofile(bpe_data / "val.bin")
    (bpe_data / "meta.json").write_text(json.dumps({"vocab_size": 50257, "tokenizer": "gpt2"}))
    cfg = load_config(TrainConfig, [str(CONFIGS[0].parent / "finetune_shakespeare.py"),
                                    f"--init_from={hf_dir}", f"--data_dir={bpe_data}",
                                    f"--out_dir={tmp_path / 'ft'}", "--block_size=32",
                                    "--gradient_accumulation_steps=1", "--max_iters=2",
                                    "--compile=False", "--device=cpu", "--eval_iters=1",
                                    "--eval_interval=2"])
    summary = train.train(cfg)
    assert summary["iter_num"] == 2 and set(summary["val_loss_averaged"]) == {"bema", "ema"}
    first = checkpoint.read_checkpoint(hf_dir)
    assert first.kind == "pretrained" and first.step == 0


@pytest.mark.parametrize("path", SMALL, ids=lambda p: p.name)
def test_small_configs_fit_a_usual_disk_and_say_how_much(path):
    """A 124M run's snapshots, post-hoc profiles and checkpoints (run_dir.disk_plan, what
    train.py prints and checks at start) stay under 50 GiB, and the config's comment gives the
    figure."""
    cfg = load_config(TrainConfig, [str(path)])
    with torch.device("meta"):
        numel = sum(p.numel() for p in GPT(GPTConfig(**model_args_from_config(
            cfg, SimpleNamespace(vocab_size=50257)))).parameters())
    total = disk_plan(cfg, numel).total / 2**30
    stated = re.search(r"disk: about (\d+) GiB", path.read_text())
    assert stated, f"{path.name} does not say how much disk its run writes"
    assert abs(total - int(stated[1])) < 1, (path.name, total)
    assert total < 50
