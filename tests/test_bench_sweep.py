"""bench_sweep.py runs end to end on a tiny synthetic trajectory: state on the device and in
host memory, 1 and 2 processes, every figure reported."""

import json

from benchmarks import bench_sweep
from benchmarks.bench_sweep import BenchSweepConfig


def test_bench_sweep_reports_every_configuration(tmp_path):
    result = bench_sweep.bench(BenchSweepConfig(
        out_dir=str(tmp_path), snapshots=3, settings=2, n_layer=1, n_head=2, n_embd=32,
        vocab_size=128, block_size=64, state_chunk=1000))
    assert result["snapshots"] == 3 and result["settings"] == 2
    assert [(r["state_device"], r["ranks"]) for r in result["rows"]] == [
        ("device", 1), ("device", 2), ("host", 1), ("host", 2)]
    for r in result["rows"]:
        assert min(r["wall_s"], r["average_s"], r["evaluate_s"], r["ms_per_update"]) > 0
        assert r["update_vs_device"] > 0 and r["speedup_vs_1_rank"] > 0
        assert len(r["timing"]) == r["ranks"]
    # the timed passes really ran the sweep, and host state changed nothing
    rows = {name: json.loads((tmp_path / name / "results.json").read_text())["rows"]
            for name in ("device_1", "host_1", "device_2", "host_2")}
    assert len(rows["device_1"]) == 2 * (1 + 2)   # first and last snapshot: raw + 2 EMAs
    assert rows["device_1"] == rows["host_1"] and rows["device_2"] == rows["host_2"]
