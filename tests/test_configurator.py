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
    assert load_config(Demo, ["--cooldown_start=500", "--cooldown_start=None"]).cooldown_start is None
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
    with pytest.raises(ConfigError, match=r"unknown config key 'max_iter' in config file .*typo\.py; "
                                          r"did you mean 'max_iters'"):
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
