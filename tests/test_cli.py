"""The command line of every entry point as users meet it: --help lists every key, a bad input
is one line `error: ...` with exit status 2 (once under torchrun), a new averaging method reaches
train.py's and average.py's config with no other edit."""

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import eval_ckpt
import export_hf
import sample
import train
from wagpt import configurator, offline_averaging
from wagpt.errors import UserError

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {"train.py": train.TrainConfig, "average.py": offline_averaging.AverageConfig,
                "eval_ckpt.py": eval_ckpt.EvalConfig, "sample.py": sample.SampleConfig,
                "export_hf.py": export_hf.ExportConfig}


def run(args, env=None):
    base = {k: v for k, v in os.environ.items() if k != "WA_TRACEBACK"}
    env = {**base, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_help_lists_every_key_with_its_default(script):
    result = run([sys.executable, script, "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python {script} ")
    for field in dataclasses.fields(ENTRY_POINTS[script]):
        assert f"  --{field.name}=" in result.stdout, field.name
    assert run([sys.executable, script, "-h"]).stdout == result.stdout


def test_help_groups_and_comments_come_from_the_source():
    text = configurator.help_text(train.TrainConfig, train.__doc__, "train.py")
    lines = text.splitlines()
    # a group heading of TrainConfig, then its fields with their trailing comments
    schedule = lines.index("learning-rate schedule")
    assert lines[schedule + 2].startswith("  --lr_schedule=cosine") and "'wsd'" in \
        lines[schedule + 2]
    # an averager's keys: its class's group, the comments of its `defaults` dict
    bema = lines.index("averaging: bema")
    assert any(line.startswith("  --bema_lag=10.0") and "ρ" in line
               for line in lines[bema:bema + 10])
    # a default the subclass sets again keeps the method's comment and adds its own
    assert any(line.startswith("  --ema_decay=0.995") and "here:" in line for line in lines)


def test_help_of_a_class_written_here(tmp_path):
    @dataclasses.dataclass
    class Demo:
        # first group
        # a note on it
        alpha: int = 1           # the alpha
                                 # continued here
        beta: str = "b"
        # second group
        gamma: float | None = None   # the gamma
    groups = configurator.describe_fields(Demo)
    assert [(g.title, g.note, entries) for g, entries in groups] == [
        ("first group", "a note on it", [("alpha", "the alpha continued here"), ("beta", "")]),
        ("second group", "", [("gamma", "the gamma")])]


def one_error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_a_typo_is_one_line_and_exit_status_2(tmp_path):
    result = run([sys.executable, "train.py", "--lerning_rate=1", f"--out_dir={tmp_path / 'x'}"])
    assert result.returncode == 2
    assert "did you mean 'learning_rate'" in one_error_line(result)
    assert not (tmp_path / "x").exists()
    # asked for, the traceback is shown too
    shown = run([sys.executable, "train.py", "--lerning_rate=1"], env={"WA_TRACEBACK": "1"})
    assert shown.returncode == 2 and "Traceback" in shown.stderr
    assert shown.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("args, phrase", [
    (["eval_ckpt.py", "--ckpt=nope.pt"], "nope.pt does not exist"),
    (["sample.py", "--ckpt=DIR"], "is a directory"),
    (["export_hf.py", "--ckpt=BAD", "--out_dir=OUT"], "not a loadable checkpoint"),
    (["average.py", "--ckpt_dir=DIR", "--methods=ema,bemma"], "'bemma' is not an averaging"),
    (["average.py", "--ckpt_dir=DIR/nope"], "does not exist"),
    (["train.py", "--init_from=resume", "--out_dir=DIR/empty", "--data_dir=DATA"],
     "holds no resume checkpoint"),
    (["train.py", "--data_dir=DIR/nodata"], "meta.json missing"),
])
def test_bad_input_is_one_line_naming_the_culprit(args, phrase, tmp_path, tiny_data_dir):
    bad = tmp_path / "ckpt_1.pt"
    bad.write_bytes(b"garbage, not a checkpoint")
    args = [a.replace("DIR", str(tmp_path)).replace("BAD", str(bad))
            .replace("OUT", str(tmp_path / "hf")).replace("DATA", str(tiny_data_dir)) for a in args]
    result = run([sys.executable, *args])
    assert result.returncode == 2
    assert phrase in one_error_line(result)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "empty").exists()


def test_a_bug_keeps_its_traceback(tmp_path):
    """Only the project's own error types are user errors: anything else is a bug."""
    script = tmp_path / "boom.py"
    script.write_text(textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(REPO)!r})
        from dataclasses import dataclass
        from wagpt.configurator import main
        @dataclass
        class C:
            x: int = 1
        def boom(cfg):
            raise KeyError("a bug")
        main(C, boom, "demo")
    """))
    result = run([sys.executable, str(script)])
    assert result.returncode == 1 and "Traceback" in result.stderr and "KeyError" in result.stderr


def test_under_torchrun_the_error_is_printed_once(tiny_data_dir, tmp_path):
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node=2", "train.py", f"--data_dir={tiny_data_dir}",
                  "--device=cpu", "--gradient_accumulation_steps=3",
                  f"--out_dir={tmp_path / 'ddp'}"])
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "multiple of the number of processes (2)" in ours[0]
    assert not (tmp_path / "ddp").exists()


TOY_METHOD = '''
import sys
sys.path.insert(0, {repo!r})
import torch
import averaging


@averaging.register
class Toy(averaging.Averager):
    """A toy method: e <- e + r (theta - e), the README's example."""
    name = "toy"
    defaults = {{
        "toy_rate": 0.5,     # r: weight of the new iterate
        "toy_start": 0,      # tau: burn-in step
        "toy_every": 1,      # phi: period
    }}
    start_key, freq_key, buffers = "toy_start", "toy_every", ("e",)

    def _validate(self, hp):
        self.rate = averaging._real(hp, "toy_rate", 0.0, 1.0)

    def _init(self, theta):
        self.e = theta.to(torch.float32, copy=True)

    def _update(self, t, theta):
        averaging.ema_update_(self.e, theta, self.rate)

    def average(self):
        return self.e


import train
from wagpt import offline_averaging
from wagpt.configurator import help_text, load_config
from wagpt.flat_params import FlatParameters
from model import GPT, GPTConfig
from wagpt.online_averaging import OnlineAveraging, averager_hparams

cfg = load_config(train.TrainConfig, ["--averaging=ema,toy", "--toy_rate=0.25"])
assert averager_hparams(cfg)["toy"] == {{"toy_rate": 0.25, "toy_start": 0, "toy_every": 1}}
assert load_config(train.TrainConfig, ["--averaging=all"]).averaging == "all"
model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=1, n_embd=8))
flat = FlatParameters(model)
online = OnlineAveraging(flat, averager_hparams(cfg))
online.start(0)
before = flat.buffer.clone()
with torch.no_grad():
    flat.buffer.add_(1.0)
online.update(1)
assert torch.allclose(online.gather("toy"), before + 0.25)

sweep = load_config(offline_averaging.AverageConfig, ["--ckpt_dir=x", "--methods=toy",
                                            "--toy_rate=[0.25,0.75]"])
settings = offline_averaging.expand_settings(sweep, first_step=0)
assert [s.label for s in settings] == ["toy[toy_rate=0.25]", "toy[toy_rate=0.75]"]
assert "averaging: toy" in help_text(train.TrainConfig, "", "train.py")
help_average = help_text(offline_averaging.AverageConfig, "", "average.py")
assert "r: weight of the new iterate" in help_average
print("toy method ok")
'''


def test_a_registered_method_reaches_train_and_average_configs(tmp_path):
    """README's "Add an averaging method": one class with @register is all train.py's and
    average.py's config parsing, --help and one online update need."""
    script = tmp_path / "toy_method.py"
    script.write_text(TOY_METHOD.format(repo=str(REPO)))
    result = run([sys.executable, str(script)])
    assert result.returncode == 0, result.stderr
    assert "toy method ok" in result.stdout


def test_wandb_missing_fails_before_anything_is_written(make_config, monkeypatch, tmp_path):
    import builtins
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb here")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_wandb)
    cfg = make_config(wandb_log=True)
    with pytest.raises(UserError, match="pip install wandb"):
        train.train(cfg)
    assert not Path(cfg.out_dir).exists()
    monkeypatch.undo()
    # the rerun needs nothing deleted (tests/test_reliability.py: the same after wandb.init fails)
    assert train.train(make_config(wandb_log=False))["iter_num"] == cfg.max_iters


def test_every_problem_is_its_own_error_line(tmp_path):
    result = run([sys.executable, "train.py", "--max_iters=100", "--n_head=5", "--device=tpu",
                  "--lerning_rate=3", f"--out_dir={tmp_path / 'x'}"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines), lines
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, phrase", [
    (["config/train_small.py", "--n_layer=2", "--n_head=2", "--n_embd=64"],
     "model_size='gpt2' (n_layer=12, n_head=12, n_embd=768) and n_layer=2, n_head=2, n_embd=64"),
    (["--n_head=5"], "n_embd=128 is not a multiple of n_head=5"),
    (["--device=mps", "--data_dir=DATA"], "no usable MPS device"),
])
def test_odd_settings_are_one_line_not_a_traceback(args, phrase, tmp_path, tiny_data_dir):
    import torch
    if "--device=mps" in args and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    args = [a.replace("DATA", str(tiny_data_dir)) for a in args]
    result = run([sys.executable, "train.py", *args, f"--out_dir={tmp_path / 'x'}"])
    assert result.returncode == 2
    assert phrase in one_error_line(result)
    assert not (tmp_path / "x").exists()
