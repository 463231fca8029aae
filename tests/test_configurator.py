"""configurator.py: config files, --key=value overrides, and the errors for bad input."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from wagpt.configurator import load_config, parse_choices
from wagpt.errors import ConfigError
from wagpt.run_dir import save_config

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Demo:
    learning_rate: float = 1e-3
    max_iters: int = 100
    compile: bool = False
    out_dir: str = "out"
    init_from: str = "scratch"
    cooldown_start: int | None = None
    wandb_run_name: str | None = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])

    def __post_init__(self):
        if self.max_iters <= 0:
            raise ValueError(f"max_iters={self.max_iters} must be > 0")


def test_defaults_and_overrides():
    cfg = load_config(Demo, ["--learning_rate=3e-4", "--max_iters=7", "--compile=True"])
    assert (cfg.learning_rate, cfg.max_iters, cfg.compile) == (3e-4, 7, True)


def test_int_sets_float_and_integral_float_sets_int():
    cfg = load_config(Demo, ["--learning_rate=1", "--max_iters=1e3"])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.max_iters == 1000 and isinstance(cfg.max_iters, int)


def test_none_default_can_be_overridden_and_reset():
    assert load_config(Demo, ["--cooldown_start=500"]).cooldown_start == 500
    cfg = load_config(Demo, ["--cooldown_start=500", "--cooldown_start=None"])
    assert cfg.cooldown_start is None
    assert load_config(Demo, ["--wandb_run_name=abc"]).wandb_run_name == "abc"


def test_value_may_contain_equals_and_strings_stay_verbatim():
    cfg = load_config(Demo, ["--init_from=runs/a=b/ckpt.pt", "--out_dir=123"])
    assert cfg.init_from == "runs/a=b/ckpt.pt"
    assert cfg.out_dir == "123"


def test_list_values():
    assert load_config(Demo, ["--betas=[0.8, 0.99]"]).betas == [0.8, 0.99]
    with pytest.raises(ConfigError, match="betas"):
        load_config(Demo, ["--betas=['a']"])


@pytest.mark.parametrize("arg, fragment", [
    ("--lerning_rate=1", "did you mean 'learning_rate'"),
    ("--max_iters=abc", "max_iters = 'abc'"),
    ("--max_iters=1.5", "max_iters = 1.5"),
    ("--compile=1", "compile = 1"),
    ("--max_iters=True", "must be a int"),
    ("--learning_rate=None", "learning_rate = None"),
    ("--max_iters", "has no value"),
    ("max_iters=3", "neither a config file"),
    ("--max_iters=0", "max_iters=0 must be > 0"),
])
def test_bad_command_line_is_a_clear_error(arg, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        load_config(Demo, [arg])


def test_parse_choices():
    assert parse_choices("kernels", " ema, bema ", ("ema", "bema", "dema")) == ["ema", "bema"]
    for text, why in (("ema,lawa", "'lawa' is unknown"), ("ema,ema", "empty or repeated"),
                      (" , ", "empty or repeated")):
        with pytest.raises(ValueError, match=f"kernels='{text}': {why}.*subset of ema,bema"):
            parse_choices("kernels", text, ("ema", "bema"))


def test_config_file_keys_types_and_typos(tmp_path):
    good = tmp_path / "good.py"
    good.write_text("import math\n_helper = 3\nlearning_rate = 2 * 1e-3\nmax_iters = 10\n")
    cfg = load_config(Demo, [str(good), "--max_iters=20"])  # later arguments win
    assert cfg.learning_rate == 2e-3 and cfg.max_iters == 20

    typo = tmp_path / "typo.py"
    typo.write_text("max_iter = 10\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'max_iter' in config file "
                                          r".*typo\.py; did you mean 'max_iters'"):
        load_config(Demo, [str(typo)])

    wrong = tmp_path / "wrong.py"
    wrong.write_text("compile = 'yes'\n")
    with pytest.raises(ConfigError, match="compile = 'yes'"):
        load_config(Demo, [str(wrong)])

    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Demo, [str(tmp_path / "missing.py")])


def test_save_config_round_trip(tmp_path):
    cfg = load_config(Demo, ["--max_iters=5"])
    save_config(cfg, tmp_path / "sub" / "config.json")
    assert json.loads((tmp_path / "sub" / "config.json").read_text())["max_iters"] == 5


@pytest.mark.parametrize("path", sorted((REPO / "config").glob("train*.py")), ids=lambda p: p.name)
def test_every_shipped_train_config_loads(path):
    from wagpt.trainer import TrainConfig
    cfg = load_config(TrainConfig, [str(path)])
    assert cfg.max_iters > 0


def test_every_problem_of_a_config_is_reported_at_once(tmp_path):
    """Unknown keys, bad values and every failed check of __post_init__, one line each."""
    from wagpt.errors import ConfigErrors
    from wagpt.trainer import TrainConfig
    typo = tmp_path / "typo.py"
    typo.write_text("max_iter = 10\nbatch_size = 'x'\n")
    with pytest.raises(ConfigErrors) as caught:
        load_config(TrainConfig, [str(typo), "--lerning_rate=1", "--max_iters=100",
                                  "--n_head=5", "--device=tpu", "--beta1=2"])
    problems = caught.value.problems
    assert len(problems) == 7, problems
    for fragment in ("'max_iter'", "batch_size = 'x'", "did you mean 'learning_rate'",
                     "beta1=2", "device='tpu'", "n_head=5", "warmup_iters=100"):
        assert sum(fragment in p for p in problems) == 1, (fragment, problems)
    # the schedule's problem says the fix: lower warmup_iters too
    assert "lower warmup_iters too, e.g. --warmup_iters=10" in problems[-1]
    # one problem alone stays a plain ConfigError
    with pytest.raises(ConfigError) as single:
        load_config(TrainConfig, ["--beta1=2"])
    assert type(single.value) is ConfigError and "beta1=2" in str(single.value)


def test_a_named_model_size_and_a_shape_key_conflict_and_config_json_says_what_runs(tmp_path):
    from wagpt.trainer import TrainConfig
    small = str(REPO / "config" / "train_small.py")
    with pytest.raises(ConfigError) as caught:
        load_config(TrainConfig, [small, "--n_layer=2", "--n_head=2", "--n_embd=64"])
    message = str(caught.value)
    assert "model_size='gpt2'" in message and "n_layer=2, n_head=2, n_embd=64" in message
    assert "--model_size=None" in message and "\n" not in message   # one problem, one line
    # the shape given alone (model_size dropped) or agreeing with the named size is fine
    cfg = load_config(TrainConfig, [small, "--model_size=None", "--n_layer=2", "--n_head=2",
                                    "--n_embd=64"])
    assert (cfg.model_size, cfg.n_layer, cfg.n_embd) == (None, 2, 64)
    cfg = load_config(TrainConfig, [small, "--n_layer=12"])
    # the named size's shape is what the config records
    save_config(cfg, tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["model_size"], saved["n_layer"], saved["n_head"], saved["n_embd"]) == \
        ("gpt2", 12, 12, 768)


def test_post_hoc_profiles_given_without_snapshots_is_a_conflict():
    from wagpt.trainer import TrainConfig
    with pytest.raises(ConfigError, match="posthoc_sigma_rel=.*snapshot_interval=0"):
        load_config(TrainConfig, ["--posthoc_sigma_rel=[0.05]"])
    assert load_config(TrainConfig, ["--posthoc_sigma_rel=[0.05]", "--snapshot_interval=10"])
    assert load_config(TrainConfig, ["--posthoc_sigma_rel=None"])   # off: nothing to conflict
