"""bench_offline.py runs end to end on a tiny trajectory and reports every figure."""

from benchmarks import bench_offline
from benchmarks.bench_offline import BenchOfflineConfig


def test_bench_offline_reports_both_regimes(tiny_data_dir, tmp_path):
    result = bench_offline.bench(BenchOfflineConfig(
        out_dir=str(tmp_path), snapshots=3, data_dir=str(tiny_data_dir), eval_iters=1))
    assert result["snapshots"] == 3 and result["settings"] == 12
    for regime in ("averaging_only", "with_evals"):
        r = result[regime]
        assert r["one_pass_s"] > 0 and r["separate_s"] > 0 and r["ratio"] > 0
    assert result["reads_s"] > 0
    # the separate passes wrote their results: they really ran every setting
    assert (tmp_path / "separate" / "results.csv").exists()
