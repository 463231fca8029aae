"""benchmarks/vs_nanogpt.py without nanoGPT: a fake nanoGPT checkout whose train.py checks its
command line the way nanoGPT's configurator does and prints log lines in nanoGPT's format; our
train.py runs for real on a tiny preset."""

import json
import os
import pickle
import subprocess

import pytest

from benchmarks import vs_nanogpt
from benchmarks.vs_nanogpt import VsNanoGPTConfig
from wagpt.configurator import load_config, main
from wagpt.trainer import TrainConfig

# nanoGPT's train.py: the type of each config key's default (its configurator rejects a value of
# another type and a key it does not define) and, in its loop, the log lines we parse.
FAKE_TRAIN = r'''
import json, os, pickle, sys
from ast import literal_eval
TYPES = dict(out_dir=str, eval_interval=int, log_interval=int, eval_iters=int, eval_only=bool,
             always_save_checkpoint=bool, init_from=str, wandb_log=bool, wandb_project=str,
             wandb_run_name=str, dataset=str, gradient_accumulation_steps=int, batch_size=int,
             block_size=int, n_layer=int, n_head=int, n_embd=int, dropout=float, bias=bool,
             learning_rate=float, max_iters=int, weight_decay=float, beta1=float, beta2=float,
             grad_clip=float, decay_lr=bool, warmup_iters=int, lr_decay_iters=int, min_lr=float,
             backend=str, device=str, dtype=str, compile=bool)
open("configurator.py").read()          # nanoGPT execs it from the working directory
cfg = {}
for arg in sys.argv[1:]:
    key, val = arg.split("=")           # as nanoGPT: a second '=' fails here
    key = key[2:]
    if key not in TYPES:
        raise ValueError(f"Unknown config key: {key}")
    try:
        val = literal_eval(val)
    except (SyntaxError, ValueError):
        pass
    assert type(val) == TYPES[key], (key, val)
    cfg[key] = val
data_dir = os.path.join("data", cfg["dataset"])
tokens = os.path.getsize(os.path.join(data_dir, "train.bin")) // 2
os.makedirs(cfg["out_dir"], exist_ok=True)
with open(os.path.join(cfg["out_dir"], "seen.json"), "w") as f:
    json.dump({"cfg": cfg, "train_tokens": tokens, "cwd": os.getcwd(),
               "meta_pkl": os.path.exists(os.path.join(data_dir, "meta.pkl"))}, f)
for it in range(cfg["max_iters"] + 1):
    slow = it % cfg["eval_interval"] == 0
    if slow:
        print(f"step {it}: train loss 3.0000, val loss {3 - it / 1000:.4f}")
    if it % cfg["log_interval"] == 0:
        ms = 1000.0 if slow else 40.0 + it % 2
        print(f"iter {it}: loss 2.5000, time {ms:.2f}ms, mfu -100.00%")
'''

TINY = {"shared": dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4,
                       gradient_accumulation_steps=1, dropout=0.0, bias=False,
                       learning_rate=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
                       max_iters=12, warmup_iters=2, lr_decay_iters=12, min_lr=1e-3,
                       eval_interval=5, eval_iters=1),
        "ours_config": None, "vocab_size": None}


@pytest.fixture
def fake_nanogpt(tmp_path):
    folder = tmp_path / "nanoGPT"
    folder.mkdir()
    (folder / "train.py").write_text(FAKE_TRAIN)
    (folder / "model.py").write_text("")
    (folder / "configurator.py").write_text("# nanoGPT's configurator\n")
    return folder


def test_parse_log_drops_warmup_and_eval_iterations():
    nanogpt = "\n".join(["step 0: train loss 4.0, val loss 4.1000"]
                        + [f"iter {i}: loss 2.0, time {50 + i}.00ms, mfu 1.00%" for i in range(11)]
                        + ["step 10: train loss 1.9, val loss 1.9500"])
    parsed = vs_nanogpt.parse_log(nanogpt, "nanogpt", eval_interval=5, log_interval=1,
                                  skip_iters=2)
    # iterations 0, 5, 10 start with an evaluation; 0 and 1 are warm-up
    assert [it for it, _ in parsed["times"]] == [2, 3, 4, 6, 7, 8, 9]
    assert parsed["times"][0] == (2, 52.0)
    assert parsed["evals"] == [(0, 4.1), (10, 1.95)]

    ours = "\n".join(f"iter {i}: loss 2.0, lr 1.00e-03, {40 + i:.1f} ms/iter, 9,000 tok/s, "
                     f"mfu n/a" for i in (5, 10, 15))
    parsed = vs_nanogpt.parse_log(ours, "ours", eval_interval=5, log_interval=5, skip_iters=2)
    # `iter 5` is the mean over steps 0..4, which include warm-up; evaluations are not in ours
    assert parsed["times"] == [(10, 50.0), (15, 55.0)]


def test_nanogpt_values_have_the_types_of_its_defaults():
    # nanoGPT's configurator asserts type(value) == type(default): a float key written as 1 fails
    floats = {"dropout", "learning_rate", "weight_decay", "beta1", "beta2", "grad_clip", "min_lr"}
    for name, preset in vs_nanogpt.PRESETS.items():
        for key in floats:
            assert isinstance(preset["shared"][key], float), (name, key)
        assert all(not isinstance(v, float) for k, v in preset["shared"].items()
                   if k not in floats), name


def test_missing_or_wrong_nanogpt_dir_is_one_line_with_the_fix(tmp_path, capsys):
    for argv in ([], [f"--nanogpt_dir={tmp_path}"]):
        with pytest.raises(SystemExit) as exit_info:
            main(VsNanoGPTConfig, vs_nanogpt.bench, vs_nanogpt.__doc__, argv=argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        assert "git clone https://github.com/karpathy/nanoGPT" in err
    with pytest.raises(ValueError, match="preset"):
        VsNanoGPTConfig(nanogpt_dir=str(tmp_path), preset="huge")


def test_gpu_commands_are_accepted_by_both_configurators(fake_nanogpt, tiny_data_dir, tmp_path,
                                                         monkeypatch):
    cfg = VsNanoGPTConfig(nanogpt_dir=str(fake_nanogpt), preset="gpt2_124m", device="cuda",
                          data_dir=str(tiny_data_dir), out_dir=str(tmp_path / "out"))
    workdir = tmp_path / "out" / "nanogpt_workdir"
    name = vs_nanogpt.prepare_nanogpt_workdir(cfg, workdir)
    assert not (workdir / "data" / name / "meta.pkl").exists()   # nanoGPT's vocab: 50304
    command = vs_nanogpt.nanogpt_command(cfg, name, tmp_path / "nano_run")
    assert {"--device=cuda", "--compile=True", "--dtype=bfloat16", "--n_layer=12",
            "--block_size=1024", "--gradient_accumulation_steps=5"} <= set(command)
    # the fake prints 301 lines; only its argument checks matter here
    subprocess.run(command, cwd=workdir, check=True, capture_output=True)
    seen = json.loads((tmp_path / "nano_run" / "seen.json").read_text())
    assert seen["cfg"]["n_embd"] == 768 and seen["meta_pkl"] is False

    ours = vs_nanogpt.ours_command(cfg, tmp_path / "ours_run")
    monkeypatch.chdir(vs_nanogpt.REPO)    # config/train_small.py is relative to the repository
    train_cfg = load_config(TrainConfig, ours[2:])
    assert (train_cfg.model_size, train_cfg.n_layer, train_cfg.vocab_size) == ("gpt2", 12, 50304)
    assert (train_cfg.device, train_cfg.dtype, train_cfg.compile) == ("cuda", "bfloat16", True)
    assert (train_cfg.gradient_accumulation_steps, train_cfg.max_iters, train_cfg.beta2) == \
        (5, 300, 0.95)


def test_one_round_end_to_end(fake_nanogpt, tiny_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(vs_nanogpt.PRESETS, "tiny", TINY)
    out = tmp_path / "out"
    result = vs_nanogpt.bench(VsNanoGPTConfig(
        nanogpt_dir=str(fake_nanogpt), preset="tiny", data_dir=str(tiny_data_dir),
        out_dir=str(out), rounds=1, skip_iters=2, averaging="ema",
        threads=1,    # a tiny model: one thread is faster (conftest.one_thread)
        bench_out=str(tmp_path / "bench.jsonl")))
    (row,) = result["rounds"]
    # the fake: 40 or 41 ms except the evaluation iterations (1000 ms), which must be dropped
    assert row["nanogpt"]["ms_per_iter"] == 40.0
    assert row["nanogpt"]["val_loss"] == pytest.approx(2.99) and row["nanogpt"]["val_step"] == 10
    # ours ran for real: 12 steps, evaluated at the end
    assert row["ours"]["ms_per_iter"] > 0 and row["ours"]["val_step"] == 12
    assert row["ours"]["timed_lines"] == 12 - 2
    assert row["ratio"] == pytest.approx(row["ours"]["ms_per_iter"] / 40.0)
    assert (out / "round_1" / "ours" / "metrics.jsonl").exists()

    # nanoGPT's data folder, outside the checkout: our .bin files and a meta.pkl from meta.json
    seen = json.loads((out / "round_1" / "nanogpt" / "seen.json").read_text())
    assert seen["cwd"] == str((out / "nanogpt_workdir").resolve())
    assert seen["cfg"]["device"] == "cpu" and seen["cfg"]["dtype"] == "float32"
    assert seen["cfg"]["compile"] is False and seen["cfg"]["always_save_checkpoint"] is False
    meta_json = json.loads((tiny_data_dir / "meta.json").read_text())
    assert seen["train_tokens"] == meta_json["train_tokens"]
    data = out / "nanogpt_workdir" / "data" / tiny_data_dir.name
    with open(data / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    chars = meta_json["chars"]
    assert meta["vocab_size"] == len(chars) == meta_json["vocab_size"]
    assert [meta["itos"][i] for i in range(len(chars))] == list(chars)
    assert all(meta["stoi"][ch] == i for i, ch in enumerate(chars))
    assert {p.name for p in fake_nanogpt.iterdir()} == {"train.py", "model.py", "configurator.py"}

    printed = capsys.readouterr().out
    assert "| round | first | nanoGPT ms/iter | ours ms/iter | ours / nanoGPT |" in printed
    assert "| 1 | nanoGPT | 40.0 |" in printed
    assert f"median ours / nanoGPT ms/iter: {result['median_ratio']:.2f}" in printed
    line = json.loads((tmp_path / "bench.jsonl").read_text())
    assert line["device"] == "cpu" and line["nanogpt_commit"] is None and line["threads"] == 1
    assert line["rounds"][0]["nanogpt"]["ms_per_iter"] == 40.0


def test_rounds_take_turns_at_going_first(fake_nanogpt, tiny_data_dir, tmp_path, monkeypatch):
    calls = []

    def fake_run(trainer, command, cwd, log_path, cfg):
        calls.append(trainer)
        return {"ms_per_iter": 10.0 if trainer == "nanogpt" else 9.0, "wall_s": 1.0,
                "val_loss": 2.0, "val_step": 2000, "timed_lines": 1}
    monkeypatch.setattr(vs_nanogpt, "run_trainer", fake_run)
    result = vs_nanogpt.bench(VsNanoGPTConfig(nanogpt_dir=str(fake_nanogpt),
                                              data_dir=str(tiny_data_dir),
                                              out_dir=str(tmp_path / "out"), rounds=3))
    assert calls == ["nanogpt", "ours", "ours", "nanogpt", "nanogpt", "ours"]
    assert result["median_ratio"] == pytest.approx(0.9)
    assert [r["first"] for r in result["rounds"]] == ["nanoGPT", "ours", "nanoGPT"]



def test_a_third_trainer_times_ours_with_averaging(fake_nanogpt, tiny_data_dir, tmp_path,
                                                   monkeypatch, capsys):
    """--averaging_also: ours with averages kept, in every round beside the two others; the
    table says what share of a step the averaging adds."""
    calls = []

    def fake_run(trainer, command, cwd, log_path, cfg):
        calls.append((trainer, [a for a in command if a.startswith("--averaging=")]))
        ms = {"nanogpt": 10.0, "ours": 8.0, "ours_averaging": 8.2}[trainer]
        return {"ms_per_iter": ms, "wall_s": 1.0, "val_loss": 2.0, "val_step": 2000,
                "timed_lines": 1}
    monkeypatch.setattr(vs_nanogpt, "run_trainer", fake_run)
    result = vs_nanogpt.bench(VsNanoGPTConfig(
        nanogpt_dir=str(fake_nanogpt), data_dir=str(tiny_data_dir), out_dir=str(tmp_path / "o"),
        rounds=2, averaging="", averaging_also="ema,bema,lawa"))
    assert calls == [("nanogpt", []), ("ours", ["--averaging="]),
                     ("ours_averaging", ["--averaging=ema,bema,lawa"]),
                     ("ours_averaging", ["--averaging=ema,bema,lawa"]),
                     ("ours", ["--averaging="]), ("nanogpt", [])]
    assert result["median_ratio"] == pytest.approx(0.8)
    printed = capsys.readouterr().out
    assert "| ours + averaging ms/iter |" in printed and "| 2.50% |" in printed
    assert "median share of a step that --averaging=ema,bema,lawa adds: 2.50%" in printed


def test_the_nanogpt_commit_is_that_of_its_own_checkout(tmp_path):
    """A git checkout of nanoGPT gives its commit; nanoGPT's files copied into a folder of
    another checkout (this repository's, say) give none, not the other checkout's commit."""
    def git(*args, cwd):
        subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
    outer = tmp_path / "outer"
    (outer / "nano").mkdir(parents=True)
    (outer / "nano" / "train.py").write_text("")
    git("init", "-q", cwd=outer)
    git("add", ".", cwd=outer)
    git("commit", "-qm", "x", cwd=outer)
    assert vs_nanogpt.nanogpt_commit(outer / "nano") is None
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=outer, capture_output=True,
                          text=True).stdout.strip()
    assert vs_nanogpt.nanogpt_commit(outer) == head and len(head) == 40
