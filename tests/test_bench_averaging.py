"""bench_averaging.py times the same update three ways; the three must compute the same thing."""

import json

import pytest
import torch

import averaging
from benchmarks import bench_averaging as ba
from wagpt.configurator import load_config
from wagpt.errors import ConfigError

SHAPES = [(11, 4), (4,), (3, 2, 5), (1,), (7, 4)]  # matrices, vectors, a 3-D tensor, a scalar-ish


def reference_bema(s, beta, alpha):
    """The spec's BEMA step in float64 on flat copies: e ← (1−β)e + βθ; out = e + α(θ − θ₀)."""
    flat = {k: torch.cat([t.reshape(-1) for t in v]).double() if isinstance(v, list)
            else v.double() for k, v in s.items()}
    ema = (1 - beta) * flat["ema"] + beta * flat["theta"]
    return ema, ema + alpha * (flat["theta"] - flat["theta0"])


@pytest.mark.parametrize("method", ["ema", "bema"])
def test_approaches_compute_the_same_update(method):
    sets = ba.make_sets(SHAPES, ba.APPROACHES, n_sets=2, device=torch.device("cpu"), seed=3)
    flat, per_param = sets["flat"][1], sets["foreach"][1]
    # set 1 holds the same values in every layout, and different values from set 0
    assert torch.equal(flat["theta"], torch.cat([t.reshape(-1) for t in per_param["theta"]]))
    assert not torch.equal(flat["theta"], sets["flat"][0]["theta"])
    assert all(t.abs().sum() > 0 for v in per_param.values() for t in v)  # random, not zeros
    ref_ema, ref_out = reference_bema(flat, ba.BEMA_BETA if method == "bema" else ba.EMA_BETA,
                                      ba.BEMA_ALPHA)
    for approach in ba.APPROACHES:
        s = sets[approach][1]
        outs = [s["out"]] if torch.is_tensor(s["out"]) else s["out"]
        for o in outs:
            o.fill_(float("nan"))  # poisoned: an unwritten element must fail
        ba.update(method, approach, s)
        got = ba.as_flat(s)
        torch.testing.assert_close(got["ema"].double(), ref_ema, rtol=1e-6, atol=1e-6)
        if method == "bema":
            torch.testing.assert_close(got["out"].double(), ref_out, rtol=1e-6, atol=1e-6)
        else:
            assert got["out"].isnan().all()  # EMA has no output buffer: out untouched
    ba.check_same_result(sets, [method])  # the check the benchmark runs before timing


def test_check_catches_different_work():
    sets = ba.make_sets(SHAPES, ("flat", "loop"), n_sets=1, device=torch.device("cpu"))
    sets["loop"][0]["theta"][2].add_(1.0)  # one tensor's inputs differ
    with pytest.raises(AssertionError, match="approach 'loop' computes a different ema"):
        ba.check_same_result(sets, ["ema"])


def test_benchmark_reports_every_row(tiny_data_dir, tmp_path):
    out = tmp_path / "avg.jsonl"
    cfg = load_config(ba.AveragingBenchConfig, [
        f"--data_dir={tiny_data_dir}", "--n_layer=1", "--n_head=2", "--n_embd=16",
        "--block_size=8", "--batch_size=2", "--device=cpu", "--warmup_iters=0",
        "--bench_warmup=1", "--bench_iters=2", "--bench_repeats=2", "--rotate_mib=1",
        "--copy_mib=4", "--step_warmup=0", "--step_iters=1", f"--bench_out={out}",
        f"--out_dir={tmp_path / 'unused'}"])
    res = ba.run(cfg)
    assert [(r["method"], r["row"]) for r in res["rows"]] == \
        [(m, a) for m in ("ema", "bema") for a in ("flat", "foreach", "loop")]
    n = res["n_params"]
    assert n == 16 * (ba.open_dataset(cfg.dataset, cfg.data_dir).vocab_size + 8) + \
        12 * 16 * 16 + 3 * 16
    assert res["buffer_sets"] > 1  # a tiny model fits any cache: the sets rotate
    assert res["copy_gb_per_s"] > 0 and res["step"]["ms"] > 0
    for r in res["rows"]:
        assert len(r["ms_blocks"]) == 2 and r["ms"] > 0 and r["gb_per_s"] > 0
        assert r["frac_of_copy_bw"] > 0 and r["frac_of_step"] > 0
        assert r["ideal_bytes_per_param"] == {"ema": 12, "bema": 20}[r["method"]]
        assert r["est_bytes_per_param"] >= r["ideal_bytes_per_param"]
        assert (r["flat_speedup_vs_loop"] is None) == (r["approach"] != "flat")
        if r["approach"] == "flat":
            assert r["flat_speedup_vs_loop"] > 0 and r["flat_speedup_vs_foreach"] > 0
    line = json.loads(out.read_text())
    assert line["n_params"] == n and line["device"] == "cpu" and line["threads"] >= 1
    assert {"date", "torch", "step", "rows", "config"} <= set(line)
    assert not (tmp_path / "unused").exists()  # nothing is written besides bench_out


def test_subset_without_step_or_dataset(tmp_path):
    # vocab_size given and no step bench: no dataset is needed
    cfg = load_config(ba.AveragingBenchConfig, [
        "--data_dir=/nonexistent", "--n_layer=1", "--n_head=2", "--n_embd=8", "--block_size=4",
        "--vocab_size=10", "--device=cpu", "--methods=bema", "--approaches=loop,flat",
        "--step_bench=False", "--bench_warmup=0", "--bench_iters=1", "--bench_repeats=1",
        "--rotate_mib=0", "--copy_mib=1"])
    res = ba.run(cfg)
    assert [r["row"] for r in res["rows"]] == ["loop", "flat"] and res["buffer_sets"] == 1
    assert res["step"] is None and res["rows"][1]["flat_speedup_vs_foreach"] is None


@pytest.mark.parametrize("arg, match", [
    ("--methods=ema,swa", "methods='ema,swa': 'swa' is unknown"),
    ("--methods=", "methods='': empty"),
    ("--approaches=flat,flat", "repeated"),
    ("--rotate_mib=-1", "rotate_mib"),
    ("--copy_mib=0", "copy_mib"),
    ("--step_iters=0", "step_iters"),
    ("--bench_iters=0", "bench_iters"),
])
def test_bad_values_are_named(arg, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ba.AveragingBenchConfig, [arg])


def test_flat_rows_use_this_projects_functions(monkeypatch):
    # the flat approach is averaging.py's functions, not a copy of their math
    calls = []
    monkeypatch.setattr(averaging, "bema_step_", lambda *a: calls.append("bema"))
    monkeypatch.setattr(averaging, "ema_update_", lambda *a: calls.append("ema"))
    s = ba.make_sets(SHAPES, ("flat",), 1, torch.device("cpu"))["flat"][0]
    ba.update("ema", "flat", s)
    ba.update("bema", "flat", s)
    assert calls == ["ema", "bema"]


def test_flat_gets_a_torch_row_where_the_kernel_runs(monkeypatch):
    cpu = torch.device("cpu")
    assert [r[:3] for r in ba._backend_rows(cpu, ba.APPROACHES)] == \
        [("flat", "flat", "torch"), ("foreach", "foreach", "torch"), ("loop", "loop", "torch")]
    # where auto picks the Triton kernel (CUDA), the torch code is timed beside it
    monkeypatch.setattr(ba.kernels, "use_triton",
                        lambda tensor: ba.kernels.get_backend() != "torch")
    rows = ba._backend_rows(cpu, ("flat", "loop"))
    assert [r[:3] for r in rows] == [("flat", "flat (triton)", "triton"),
                                     ("flat", "flat (torch)", "torch"), ("loop", "loop", "torch")]
    with rows[1][3]():
        assert ba.kernels.get_backend() == "torch"
    with rows[0][3]():
        assert ba.kernels.get_backend() == "auto"
