"""bench.py runs the training step of a config and reports throughput."""

import json

import pytest

import bench
from wagpt.configurator import load_config
from wagpt.errors import ConfigError


def test_bench_reports_throughput(tiny_data_dir, tmp_path):
    out = tmp_path / "bench.jsonl"
    cfg = load_config(bench.BenchConfig, [
        f"--data_dir={tiny_data_dir}", "--n_layer=2", "--n_head=2", "--n_embd=32",
        "--block_size=16", "--batch_size=4", "--device=cpu", "--bench_warmup=1",
        "--bench_iters=2", "--bench_repeats=2", f"--bench_out={out}", "--warmup_iters=0",
        f"--out_dir={tmp_path / 'unused'}"])
    result = bench.measure_throughput(cfg)
    assert result["tokens_per_iter"] == 64 and len(result["ms_per_iter_blocks"]) == 2
    assert result["ms_per_iter"] > 0 and result["mfu"] is None  # no known peak on CPU
    assert json.loads(out.read_text())["tokens_per_iter"] == 64
    assert not (tmp_path / "unused").exists()  # bench writes no checkpoints


def test_bench_keys_are_checked():
    with pytest.raises(ConfigError, match="bench_iters"):
        load_config(bench.BenchConfig, ["--bench_iters=0"])
