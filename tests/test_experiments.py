"""The experiment scripts (experiments/*.py) end to end on a tiny model for a few steps: their
runs, the analysis, table.md, results.json and the figure. The experiments themselves are in
docs/results.md; these only check that each command still runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import (bema_finetune, common, compare_averaging, coupled_adam_isotropy,
                         lawa_lr_spacing, wsd_cooldown)
from wagpt.configurator import load_config

REPO = Path(__file__).resolve().parent.parent


def smoke(module, config_cls, tmp_path, *args):
    cfg = load_config(config_cls, ["--smoke=True", "--seeds=1", f"--out_dir={tmp_path / 'exp'}",
                                   f"--figure={tmp_path / 'figure.png'}", *args])
    results = module.run(cfg)
    assert (tmp_path / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "exp" / "table.md").read_text().startswith(("|", "Val", "WSD", "Every"))
    assert json.loads((tmp_path / "exp" / "results.json").read_text())["wall_s"] > 0
    runs = [json.loads(line) for line in (tmp_path / "exp" / "runs.jsonl").read_text()
            .splitlines()]
    assert runs and all(r["ok"] for r in runs)
    assert not list((tmp_path / "exp").rglob("posthoc"))   # no profiles: they are not read
    return results, cfg


def test_bema_finetune(tiny_data_dir, tmp_path):
    results, cfg = smoke(bema_finetune, bema_finetune.BemaFinetuneConfig, tmp_path,
                         f"--data_dir={tiny_data_dir}", f"--finetune_data_dir={tiny_data_dir}")
    assert results["raw_identical"]   # the EMA twin run trains bitwise the same weights
    assert set(results["methods"]) == set(bema_finetune.labels(cfg))
    assert {"BEMA φ=1", "EMA φ=1", "BEMA φ=2", "EMA φ=4"} <= set(results["methods"])
    # the offline φ > 1 are read over θ₀ and the fine-tuning snapshots, on the same val batches
    assert results["offline_vs_online_raw_max_abs_diff"] < 1e-5
    curves = results["methods"]
    # an EMA acting every 4 steps holds still in between: equal at steps 4k and 4k + 2
    ema4 = curves["EMA φ=4"]["curves"][0]
    assert ema4[4] == ema4[6] and ema4[4] != ema4[2]
    # a second call finds every run done and only redoes the analysis
    again = bema_finetune.run(cfg)
    assert again["methods"]["BEMA φ=2"]["final"] == results["methods"]["BEMA φ=2"]["final"]


def test_wsd_cooldown(tiny_data_dir, tmp_path):
    results, cfg = smoke(wsd_cooldown, wsd_cooldown.WsdCooldownConfig, tmp_path,
                         f"--data_dir={tiny_data_dir}", "--lengths=[1000,2000]",
                         "--shapes=['1-sqrt','linear']", "--fractions=[0.2,0.4]",
                         "--learning_rates=[0.001,0.01]", f"--sweep_figure={tmp_path / 's.png'}")
    # average.py's raw weights on the same batches are train.py's numbers
    assert results["average_vs_train_raw_max_abs_diff"] < 1e-5
    assert results["compute"] == {"branched_family_steps": 16 + 2 + 4,
                                  "cosine_runs_steps": 30}
    # every schedule and length swept over every LR; the shape runs at the best WSD LR of T=20
    assert set(results["sweep"]) == {f"{s}/T={t}" for s in ("cosine", "WSD") for t in (10, 20)}
    assert all(set(v) == {"0.001", "0.01"} for v in results["sweep"].values())
    wsd = results["sweep"]["WSD/T=20"]
    assert results["shape_lr"] == min((0.001, 0.01), key=lambda lr: sum(wsd[f"{lr:g}"]))
    assert results["best_lr_at_grid_edge"]["WSD/T=20"]   # two LRs: the best is at an edge
    assert [r["shape"] for r in results["shapes"]] == ["1-sqrt", "linear", "1-sqrt"]
    low, high = results["shapes"][1]["interval"]
    assert low <= sum(results["shapes"][1]["diff"]) / 2 <= high
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the shape runs' 2 seeds: the sweep's seed 1337 at that LR and one more
    assert results["shape_seeds"] == [1337, 1338]


@pytest.mark.parametrize("alpha, df, t", [(0.05, 1, 12.706), (0.05, 2, 4.303), (0.05, 4, 2.776),
                                          (0.01, 4, 4.604), (0.05, 30, 2.042)])
def test_t_critical_matches_the_table(alpha, df, t):
    assert abs(common.t_critical(alpha, df) - t) < 5e-4


def test_lawa_lr_spacing(tiny_data_dir, tmp_path):
    results, _ = smoke(lawa_lr_spacing, lawa_lr_spacing.LawaConfig, tmp_path,
                       f"--data_dir={tiny_data_dir}", "--spacings=[1,2]")
    assert set(results["gains"]) == {f"{lr}/{m}" for lr in ("0.001", "0.01") for m in
                                     ("LAWA Δ=1", "LAWA Δ=2", "EMA age 2", "EMA age 4")}


def test_coupled_adam_isotropy(tiny_data_dir, tmp_path):
    results, _ = smoke(coupled_adam_isotropy, coupled_adam_isotropy.CoupledAdamConfig, tmp_path,
                       f"--data_dir={tiny_data_dir}")
    sizes = [r["steps"] for r in results["loss_by_size"]]
    assert sizes == [10, 20]
    # the tokens seen grow with the data and are part of the vocabulary
    seen = [r["seen"][0] for r in results["loss_by_size"]]
    assert 0 < seen[0] <= seen[1] <= results["vocab_size"]
    final = results["along"]["adamw/T=20"][0][20]
    assert final["seen_tokens"] == seen[1]
    assert {"isotropy", "isotropy_seen", "norm_ratio", "norm_ratio_seen"} <= set(final)
    subsets = {(r["metric"], r["rows"]) for r in results["embedding_rows"]}
    assert ("isotropy I(E)", "rows of seen tokens") in subsets
    assert ("isotropy I(E)", "all token rows") in subsets


def test_compare_averaging_chooses_on_held_out_batches(tiny_data_dir, tmp_path):
    results, _ = smoke(compare_averaging, compare_averaging.CompareConfig, tmp_path,
                       f"--data_dir={tiny_data_dir}", "--seeds=2")
    methods = [r["method"] for r in results["table"]]
    assert methods == ["raw", "ema", "lawa"] and results["seeds"] == [1337, 1338]
    for seed in ("1337", "1338"):
        best = results["best"][seed]
        assert best["ema"]["chosen_on"] == "held-out batches" and best["ema"]["select_loss"]
        # the reported gain is over the raw weights of the same seed, on the eval batches
        assert best["ema"]["gain"] == pytest.approx(best["raw"]["val_loss"] -
                                                    best["ema"]["val_loss"])


def git_state():
    return subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all",
                           "docs", "config", "experiments"], cwd=REPO, capture_output=True,
                          text=True).stdout


def test_a_smoke_experiment_leaves_the_work_tree_unchanged(tiny_data_dir, tmp_path):
    """The figures go to out_dir unless --publish=True (never with --smoke=True): the committed
    docs/img/*.png are not touched by a run that did not ask to publish."""
    before = git_state()
    mtimes = {p: p.stat().st_mtime_ns for p in (REPO / "docs" / "img").glob("*.png")}
    result = subprocess.run([sys.executable, "-m", "experiments.lawa_lr_spacing", "--smoke=True",
                             "--seeds=1", "--spacings=[1,2]", f"--data_dir={tiny_data_dir}",
                             f"--out_dir={tmp_path / 'exp'}"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "exp" / "lawa_lr_spacing.png").read_bytes()[:4] == b"\x89PNG"
    assert git_state() == before
    assert mtimes == {p: p.stat().st_mtime_ns for p in (REPO / "docs" / "img").glob("*.png")}
    refused = subprocess.run([sys.executable, "-m", "experiments.lawa_lr_spacing",
                              "--smoke=True", "--publish=True", f"--out_dir={tmp_path / 'x'}"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: publish=True with smoke=True: a smoke test's figure would replace the published "
        "one; drop --publish"]


def test_publish_puts_the_figures_in_docs(tmp_path):
    cfg = load_config(wsd_cooldown.WsdCooldownConfig, ["--publish=True",
                                                       f"--out_dir={tmp_path}"])
    cfg = common.resolve_paths(cfg)
    assert cfg.figure == str(REPO / "docs" / "img" / "wsd_cooldown.png")
    assert cfg.sweep_figure == str(REPO / "docs" / "img" / "wsd_lr_sweep.png")
    cfg = common.resolve_paths(load_config(wsd_cooldown.WsdCooldownConfig,
                                           [f"--out_dir={tmp_path}"]))
    assert cfg.figure == str(tmp_path / "wsd_cooldown.png")
    assert cfg.sweep_figure == str(tmp_path / "wsd_lr_sweep.png")


@pytest.mark.parametrize("module", [bema_finetune, wsd_cooldown, lawa_lr_spacing,
                                    coupled_adam_isotropy, compare_averaging])
def test_help_lists_the_keys(module, capsys):
    from wagpt.configurator import help_text
    cls = next(v for k, v in vars(module).items() if k.endswith("Config")
               and k != "ExperimentConfig" and isinstance(v, type))
    text = help_text(cls, module.__doc__, "x.py")
    assert "--seeds=" in text and "--smoke=False" in text and "--figure=" in text
