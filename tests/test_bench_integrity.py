"""bench_integrity.py runs end to end on a tiny model and times every step it reports."""

from benchmarks import bench_integrity
from benchmarks.bench_integrity import BenchIntegrityConfig


def test_bench_integrity_times_the_checks_and_the_file_they_guard(tmp_path):
    result = bench_integrity.bench(BenchIntegrityConfig(dir=str(tmp_path), n_layer=1, n_embd=32,
                                                        n_head=2, repeats=1))
    assert set(result["seconds"]) == {"checksum", "finite", "finite_elementwise", "write",
                                      "read_verified", "read_unverified", "resume_checksum"}
    assert all(s > 0 for s in result["seconds"].values())
    assert result["snapshot_bytes"] == 4 * result["parameters"]
    assert (tmp_path / "snapshots" / "step_0000000.safetensors").exists()
