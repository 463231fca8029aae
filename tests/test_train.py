"""train.py end to end on a tiny model: exact resume, branching, stopping, logging, bad input."""

import json
import math
from pathlib import Path

import pytest
import torch

import train
from wagpt import checkpoint, run_dir, runtime
from wagpt.run_dir import disk_plan
from wagpt.trainer import Checkpointer, NonFiniteLossError, build, load_start, open_run_data


def final_state(out_dir):
    return checkpoint.read_checkpoint(checkpoint.latest_resume(out_dir))


def assert_same_tensors(a, b):
    """Bitwise equality of two nested structures of tensors/numbers."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


def test_run_logs_evals_and_checkpoints(make_config):
    cfg = make_config()
    summary = train.train(cfg)
    assert summary["iter_num"] == 8 and summary["stopped_by"] is None
    assert summary["val_loss"] < math.log(22)  # learned something beyond uniform over the vocab
    records = [json.loads(line) for line in open(f"{cfg.out_dir}/metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in steps] == [2, 4, 6, 8]
    assert [r["iter"] for r in evals] == [0, 4, 8]
    assert {"iter", "lr", "loss", "tokens", "ms_per_iter", "mfu"} <= steps[0].keys()
    assert steps[-1]["tokens"] == 8 * 4 * 16
    saved = json.load(open(f"{cfg.out_dir}/config.json"))
    assert saved["max_iters"] == 8
    ckpt = final_state(cfg.out_dir)
    assert ckpt.step == 8 and ckpt.config["max_iters"] == 8
    assert [p.name for p in checkpoint.list_resume_checkpoints(cfg.out_dir)] == \
        ["ckpt_0000004.pt", "ckpt_0000008.pt"]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_exact_resume_is_bitwise(make_config, tmp_path, grad_accum):
    # dropout on, so the RNG matters too; the cosine schedule makes every step's LR different
    # every averager on, acting at steps that straddle the stop at step 5
    common = dict(dropout=0.1, gradient_accumulation_steps=grad_accum, max_iters=10,
                  ckpt_interval=3, eval_interval=5, log_interval=1, averaging="all",
                  bema_update_freq=2, swa_start=3, lawa_interval=3,
                  wa_interval=1, wa_horizon=3, wa_windows=2)
    train.train(make_config(out_dir=str(tmp_path / "once"), **common))
    first = train.train(make_config(out_dir=str(tmp_path / "twice"), stop_iter=5, **common))
    assert first["iter_num"] == 5 and first["stopped_by"] == "stop_iter"
    train.train(make_config(out_dir=str(tmp_path / "twice"), init_from="resume", **common))
    once, twice = final_state(tmp_path / "once"), final_state(tmp_path / "twice")
    assert twice.step == 10
    assert_same_tensors(once.weights, twice.weights)
    assert_same_tensors(once.optimizer, twice.optimizer)
    assert_same_tensors(once.averaging, twice.averaging)
    # the metrics history of the resumed run is the uninterrupted one's (timings aside)
    def history(path):
        rows = [json.loads(line) for line in open(path / "metrics.jsonl")]
        return [{k: v for k, v in r.items() if k not in ("ms_per_iter", "mfu")} for r in rows]
    assert history(tmp_path / "once") == history(tmp_path / "twice")


def test_branch_a_cooldown_from_a_checkpoint(make_config, tmp_path):
    constant = make_config(out_dir=str(tmp_path / "const"), lr_schedule="constant", max_iters=8,
                           keep_last=0, log_interval=1)
    train.train(constant)
    branch = make_config(out_dir=str(tmp_path / "cooldown"), lr_schedule="wsd", max_iters=8,
                         init_from=str(tmp_path / "const" / "ckpt_0000004.pt"),
                         cooldown_start=4, cooldown_shape="linear", log_interval=1)
    summary = train.train(branch)
    assert summary["iter_num"] == 8
    lrs = {r["iter"]: r["lr"] for r in map(json.loads, open(tmp_path / "cooldown/metrics.jsonl"))
           if "lr" in r}
    assert sorted(lrs) == [5, 6, 7, 8]  # continued from the loaded step
    # linear cooldown from step 4 to 8: multipliers 1, .75, .5, .25 at steps 4..7
    assert [round(lrs[s] / 1e-2, 6) for s in (5, 6, 7, 8)] == [1.0, 0.75, 0.5, 0.25]
    # up to the branch point the two runs saw the same weights: the branch loaded them exactly
    const_4 = checkpoint.read_checkpoint(tmp_path / "const" / "ckpt_0000004.pt")
    assert final_state(tmp_path / "cooldown").tokens_seen == 2 * const_4.tokens_seen


def test_branch_from_a_snapshot(make_config, tmp_path):
    train.train(make_config(out_dir=str(tmp_path / "a"), snapshot_interval=4))
    snaps = checkpoint.list_snapshots(tmp_path / "a" / "snapshots")
    assert [p.name for p in snaps] == ["step_0000000.safetensors", "step_0000004.safetensors",
                                       "step_0000008.safetensors"]
    # a snapshot carries no averager state: averaging in the branch starts where it starts;
    # every averager's start key (and the post-hoc profiles') is named at once
    with pytest.raises(ValueError) as caught:
        train.train(make_config(out_dir=str(tmp_path / "b"), init_from=str(snaps[1]),
                                snapshot_interval=4))
    assert [p.split(";")[1].split()[1] for p in caught.value.problems] == [
        "--ema_update_after=4", "--bema_update_after=4", "--lawa_start=4",
        "--posthoc_update_after=4"]
    assert not (tmp_path / "b").exists()
    summary = train.train(make_config(out_dir=str(tmp_path / "b"), init_from=str(snaps[1]),
                                      ema_update_after=4, bema_update_after=4, lawa_start=4))
    assert summary["iter_num"] == 8
    assert summary["val_loss_averaged"].keys() == {"ema", "bema", "lawa"}


def test_existing_run_is_never_overwritten(make_config):
    cfg = make_config(max_iters=4)
    train.train(cfg)
    before = checkpoint.latest_resume(cfg.out_dir).read_bytes()
    with pytest.raises(FileExistsError, match="--init_from=resume"):
        train.train(cfg)
    assert checkpoint.latest_resume(cfg.out_dir).read_bytes() == before


def test_resume_without_checkpoint_is_a_clear_error(make_config):
    with pytest.raises(FileNotFoundError, match="--init_from=scratch"):
        train.train(make_config(init_from="resume"))


def test_non_finite_loss_stops_with_last_checkpoint_intact(make_config, monkeypatch):
    cfg = make_config(max_iters=12, ckpt_interval=4, log_interval=2)
    real_step = train.train_step
    calls = {"n": 0}

    def step_that_diverges(*args, **kwargs):
        calls["n"] += 1
        loss = real_step(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 6 else loss

    monkeypatch.setattr(train, "train_step", step_that_diverges)
    with pytest.raises(NonFiniteLossError, match="ckpt_0000004.pt"):
        train.train(cfg)
    ckpts = checkpoint.list_resume_checkpoints(cfg.out_dir)
    assert [p.name for p in ckpts] == ["ckpt_0000004.pt"]
    wte = checkpoint.read_checkpoint(ckpts[0]).weights["transformer.wte.weight"]
    assert torch.isfinite(wte).all()


def test_bad_sizes_fail_before_training(make_config):
    with pytest.raises(ValueError, match="vocab_size"):
        train.train(make_config(vocab_size=5))
    with pytest.raises(ValueError, match="block_size"):
        train.train(make_config(block_size=100_000))


@pytest.mark.parametrize("key, value", [("max_iters", 0), ("dtype", "float16"),
                                        ("model_size", "gpt5"), ("stop_iter", 99),
                                        ("optimizer", "sgd"), ("lr_schedule", "linear")])
def test_impossible_config_values_name_the_key(make_config, key, value):
    with pytest.raises(ValueError, match=key):
        make_config(**{key: value})


@pytest.mark.parametrize("device,world_size,expected", [("cuda", 1, "cuda:0"),
                                                        ("auto", 1, "cuda:0"),
                                                        ("cuda:1", 1, "cuda:1"),
                                                        ("cuda", 2, "cuda:1")])
def test_cuda_device_gets_an_index(monkeypatch, device, world_size, expected):
    """torch.cuda.set_device rejects a bare "cuda" (seen on an H100 with torch 2.11): the runtime
    always names the GPU by index. CUDA is faked, so this runs without one."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(d))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("LOCAL_RANK", "1" if world_size > 1 else "0")
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: True)   # no process group here
    monkeypatch.setattr(runtime.dist, "get_backend", lambda: "gloo")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:   # init_runtime turns TF32 on; these flags are not plain attributes for monkeypatch
        chosen_runtime = runtime.init_runtime(device, "auto")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert chosen == [expected] and chosen_runtime.device == torch.device(expected)


def test_the_disk_plan_printed_at_start_is_what_the_run_writes(make_config, capsys):
    """Resume checkpoints kept, snapshots (θ_0's too), post-hoc profile files (not at their
    burn-in) and averaged snapshots (at every snapshot from each burn-in on, and at the end)."""
    cfg = make_config(max_iters=10, snapshot_interval=4, save_averaged=True, ckpt_interval=3,
                      keep_last=2, posthoc_update_after=1, ema_update_after=5)
    train.train(cfg)
    printed = next(line for line in capsys.readouterr().out.splitlines()
                   if line.startswith("disk: "))
    out = Path(cfg.out_dir)
    found = {"resume checkpoints": len(checkpoint.list_resume_checkpoints(out)),
             "snapshots": len(list((out / "snapshots").iterdir())),
             "post-hoc profile files": len(list((out / "posthoc").iterdir())),
             "averaged snapshots": len(list((out / "averaged").rglob("*.safetensors")))}
    assert found == {"resume checkpoints": 2, "snapshots": 3, "post-hoc profile files": 2,
                     "averaged snapshots": 2 + 3 + 3}   # ema from step 5: 8 and 10
    for what, files in found.items():
        assert f"{what} {files} x " in printed, (what, printed)
    written = sum(p.stat().st_size for p in out.rglob("*")
                  if p.is_file() and p.suffix in (".pt", ".safetensors"))
    numel = sum(t.numel() for t in checkpoint.read_checkpoint(
        out / "snapshots/step_0000000.safetensors").weights.values())
    planned = disk_plan(cfg, numel).total
    assert abs(written - planned) < 0.05 * planned   # headers and metadata aside


def test_a_run_that_does_not_fit_on_its_disk_is_refused_naming_the_keys(make_config,
                                                                        monkeypatch):
    monkeypatch.setattr(run_dir, "free_space", lambda path: 2**20)   # 1 MiB free
    cfg = make_config(snapshot_interval=1)
    with pytest.raises(run_dir.DiskError) as caught:
        train.train(cfg)
    message = str(caught.value)
    assert "1.0 MiB free" in message and "snapshot_interval" in message
    assert "posthoc_sigma_rel (None: off)" in message and "keep_last" in message
    assert not Path(cfg.out_dir).exists()   # refused before anything is written


def test_a_branch_may_crop_the_context_as_nanogpt_does(make_config, tmp_path):
    train.train(make_config(out_dir=str(tmp_path / "a"), max_iters=4))
    source = checkpoint.read_checkpoint(tmp_path / "a" / "ckpt_0000004.pt")
    branch = make_config(out_dir=str(tmp_path / "b"), init_from=str(source.path), block_size=8,
                         max_iters=6, averaging="")
    # the first step trains on the cropped model with the moments of the positions kept
    summary = train.train(branch)
    assert summary["iter_num"] == 6
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["block_size"] == 8 and final_state(tmp_path / "b").model_args["block_size"] == 8
    # the branch's first state is the file's, cropped: evaluate it without training
    start = train.train(make_config(out_dir=str(tmp_path / "c"), init_from=str(source.path),
                                    block_size=8, averaging="", eval_only=True))
    assert start["iter_num"] == 4 and not (tmp_path / "c").exists()
    cfg, start_file = load_start(branch)
    run = build(cfg, runtime.init_runtime("cpu"), open_run_data(cfg, start_file))
    Checkpointer(run, cfg, runtime.init_runtime("cpu")).load(start_file)
    wpe = run.model.transformer.wpe.weight
    assert torch.equal(wpe, source.weights["transformer.wpe.weight"][:8])
    saved_moments = next(s for s in source.optimizer["state"].values()
                         if s["exp_avg"].shape == (16, 32))
    assert torch.equal(run.optimizer.state[wpe]["exp_avg"], saved_moments["exp_avg"][:8])
    # a resume keeps the context; a branch cannot lengthen it
    with pytest.raises(ValueError, match="block_size=8 but .* block_size=16"):
        train.train(make_config(out_dir=str(tmp_path / "a"), init_from="resume", block_size=8))
    with pytest.raises(ValueError, match="shorten the context, not lengthen it"):
        train.train(make_config(out_dir=str(tmp_path / "d"), init_from=str(source.path),
                                block_size=32))


def test_eval_only_evaluates_the_start_point_and_writes_nothing(make_config):
    cfg = make_config(max_iters=8)
    done = train.train(cfg)
    files = {p: p.stat().st_mtime_ns for p in Path(cfg.out_dir).rglob("*")}
    again = train.train(make_config(max_iters=8, init_from="resume", eval_only=True))
    assert again["iter_num"] == 8 and again["stopped_by"] == "eval_only"
    assert again["val_loss"] == done["val_loss"]
    assert again["val_loss_averaged"] == done["val_loss_averaged"]   # the saved averages
    assert {p: p.stat().st_mtime_ns for p in Path(cfg.out_dir).rglob("*")} == files
