"""The experiment scripts (experiments/*.py) end to end on a tiny model for a few steps: their
runs, the analysis, table.md, results.json and the figure. The experiments themselves are in
docs/results.md; these only check that each command still runs."""

import json

import pytest

from experiments import bema_finetune, coupled_adam_isotropy, lawa_lr_spacing, wsd_cooldown
from wagpt.configurator import load_config


def smoke(module, config_cls, tmp_path, *args):
    cfg = load_config(config_cls, ["--smoke=True", "--seeds=1", f"--out_dir={tmp_path / 'exp'}",
                                   f"--figure={tmp_path / 'figure.png'}", *args])
    results = module.run(cfg)
    assert (tmp_path / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "exp" / "table.md").read_text().startswith(("|", "Val", "WSD"))
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
    assert set(results["methods"]) == set(bema_finetune.METHODS)
    # a second call finds every run done and only redoes the analysis
    again = bema_finetune.run(cfg)
    assert again["methods"]["BEMA"]["final"] == results["methods"]["BEMA"]["final"]


def test_wsd_cooldown(tiny_data_dir, tmp_path):
    results, _ = smoke(wsd_cooldown, wsd_cooldown.WsdCooldownConfig, tmp_path,
                       f"--data_dir={tiny_data_dir}", "--lengths=[1000,2000]",
                       "--shapes=['1-sqrt','linear']", "--fractions=[0.2,0.4]")
    # average.py's raw weights on the same batches are train.py's numbers
    assert results["average_vs_train_raw_max_abs_diff"] < 1e-5
    assert results["compute"] == {"branched_family_steps": 16 + 2 + 4,
                                  "cosine_runs_steps": 30}


def test_lawa_lr_spacing(tiny_data_dir, tmp_path):
    results, _ = smoke(lawa_lr_spacing, lawa_lr_spacing.LawaConfig, tmp_path,
                       f"--data_dir={tiny_data_dir}", "--spacings=[1,2]")
    assert set(results["gains"]) == {f"{lr}/{m}" for lr in ("0.001", "0.01") for m in
                                     ("LAWA Δ=1", "LAWA Δ=2", "EMA age 2", "EMA age 4")}


def test_coupled_adam_isotropy(tiny_data_dir, tmp_path):
    results, _ = smoke(coupled_adam_isotropy, coupled_adam_isotropy.CoupledAdamConfig, tmp_path,
                       f"--data_dir={tiny_data_dir}")
    rows = {r["key"]: r for r in results["rows"]}
    assert {"val_loss", "isotropy", "isotropy_solver_sign_all_rows", "norm_ratio"} <= set(rows)


@pytest.mark.parametrize("module", [bema_finetune, wsd_cooldown, lawa_lr_spacing,
                                    coupled_adam_isotropy])
def test_help_lists_the_keys(module, capsys):
    from wagpt.configurator import help_text
    cls = next(v for k, v in vars(module).items() if k.endswith("Config")
               and k != "ExperimentConfig" and isinstance(v, type))
    text = help_text(cls, module.__doc__, "x.py")
    assert "--seeds=" in text and "--smoke=False" in text and "--figure=" in text
