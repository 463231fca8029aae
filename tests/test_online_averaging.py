"""Online averaging: config keys, DDP sharding (equal to one process), evaluation swaps, resume
state, and train.py with averaging on (training unchanged, averages saved)."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train
from averaging import AVERAGERS
from model import GPT, GPTConfig
from wagpt import checkpoint
from wagpt.configurator import load_config
from wagpt.dataloader import evaluate_loss, open_dataset
from wagpt.errors import ConfigError
from wagpt.flat_params import FlatParameters
from wagpt.online_averaging import OnlineAveraging
from wagpt.runtime import init_runtime
from wagpt.trainer import TrainConfig, eval_batches

ALL = ",".join(AVERAGERS)
TINY = dict(block_size=8, vocab_size=11, n_layer=2, n_head=1, n_embd=8, dropout=0.0, bias=True)
# every method, with periods and windows short enough to act often within 12 steps
HPARAMS = {
    "ema": dict(ema_decay=0.9, ema_warmup=True, ema_update_after=1, ema_update_freq=1),
    "bema": dict(bema_update_after=2, bema_update_freq=2, bema_lag=3.0),
    "dema": dict(dema_update_after=0, dema_lag=2.0),
    "ouema": dict(ouema_update_after=1),
    "swa": dict(swa_start=3, swa_freq=2),
    "lawa": dict(lawa_k=3, lawa_interval=2, lawa_start=0),
    "wa": dict(wa_interval=1, wa_horizon=3, wa_windows=2, wa_start=1),
    "phema": dict(phema_sigma_rel=0.1, phema_update_after=1, phema_update_freq=2),
}
STEPS = 12


# ------------------------------------------------------------------------------------ config

def test_every_averager_key_is_a_train_config_key():
    fields = {f for f in TrainConfig.__dataclass_fields__}
    for cls in AVERAGERS.values():
        assert set(cls.defaults) <= fields, cls.name


@pytest.mark.parametrize("args, match", [
    (["--averaging=ema,bemma"], "'bemma' is not an averaging method"),
    (["--averaging=ema,ema"], "lists a method twice"),
    (["--averaging=lawa", "--lawa_k=0"], "lawa_k=0"),
    (["--averaging=dema", "--dema_ema_power=1.5"], "dema_ema_power=1.5"),
    (["--averaging=ouema", "--ouema_bias_power=0"], "ouema_bias_power=0"),
    (["--averaging=bema", "--bema_lag=0", "--bema_multiplier=0.5", "--bema_update_freq=1"],
     "bema_lag"),
    (["--averaging=wa", "--wa_horizon=7", "--wa_interval=2"], "wa_horizon=7"),
    (["--bema_lagg=3"], "did you mean 'bema_lag'"),
])
def test_bad_averaging_settings_fail_at_startup_naming_the_key(args, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        load_config(TrainConfig, args)


# ------------------------------------------------------------------------- sharding (DDP)

def theta_at(step, numel):
    """θ_s of a synthetic run: a fresh random vector per step, the same in every process."""
    return torch.randn(numel, generator=torch.Generator().manual_seed(1000 + step))


def run_online(rank, world, steps, saved=None, start=0):
    """Drive OnlineAveraging over the synthetic trajectory; returns its state and averages."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    flat = FlatParameters(model)
    online = OnlineAveraging(flat, HPARAMS, rank, world)
    if saved is not None:
        online.load_state_dict(saved, "test")
    for step in range(start, steps + 1):
        with torch.no_grad():
            flat.buffer.copy_(theta_at(step, flat.buffer.numel()))
        if step == start:
            online.start(step)
        else:
            online.update(step)
    averages = {name: online.gather(name).clone() for name in online.ready()}
    return online.state_dict(), averages, online.memory_bytes(), flat.buffer.numel()


def _worker(rank, world, init_file, result_file, saved):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        start = 0 if saved is None else saved["ema"]["step"]
        result = run_online(rank, world, STEPS, saved, start)
        if rank == 0:
            torch.save(result, result_file)
    finally:
        dist.destroy_process_group()


def run_sharded(tmp_path, world, saved=None):
    result = tmp_path / f"result{world}.pt"
    mp.spawn(_worker, args=(world, tmp_path / f"pg{world}", result, saved), nprocs=world)
    return torch.load(result, weights_only=True)


def assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name]["step"] == b[name]["step"] and a[name]["counters"] == b[name]["counters"]
        for key, tensor in a[name]["tensors"].items():
            assert torch.equal(tensor, b[name]["tensors"][key]), f"{name}.{key}"


def test_sharded_averaging_over_3_processes_equals_one_process(tmp_path):
    single_state, single_avg, single_bytes, numel = run_online(0, 1, STEPS)
    assert numel % 3   # the shards are uneven: the last rank's slice is shorter
    state, averages, rank0_bytes, _ = run_sharded(tmp_path, 3)
    assert_equal_states(state, single_state)   # elementwise math: bitwise equal
    assert averages.keys() == single_avg.keys() == set(AVERAGERS)
    for name in averages:
        assert torch.equal(averages[name], single_avg[name]), name
    assert rank0_bytes == pytest.approx(single_bytes / 3, rel=0.05)   # memory per rank ≈ 1/world


def test_state_saved_by_one_process_continues_under_two(tmp_path):
    full_state, full_avg, _, _ = run_online(0, 1, STEPS)
    half_state, _, _, _ = run_online(0, 1, 6)
    _, averages, _, _ = run_sharded(tmp_path, 2, saved=half_state)
    for name in full_avg:
        assert torch.equal(averages[name], full_avg[name]), name


# ------------------------------------------------------------------------ single process

def test_start_refuses_an_averager_whose_burn_in_has_passed():
    flat = FlatParameters(GPT(GPTConfig(**TINY)))
    online = OnlineAveraging(flat, {"bema": {"bema_update_after": 7}, "ema": {}})
    with pytest.raises(ValueError, match="--ema_update_after=5"):
        online.start(5)
    online = OnlineAveraging(flat, {"bema": {"bema_update_after": 3}})
    online.start(0)
    assert online.ready() == []
    with pytest.raises(RuntimeError, match="has not started"):
        with online.swapped_in("bema"):
            pass


def test_resume_with_other_hyperparameters_is_refused_naming_the_key():
    flat = FlatParameters(GPT(GPTConfig(**TINY)))
    online = OnlineAveraging(flat, {"bema": {}})
    online.start(0)
    saved = online.state_dict()
    other = OnlineAveraging(flat, {"bema": {"bema_lag": 3.0}})
    with pytest.raises(ValueError, match="bema_lag"):
        other.load_state_dict(saved, "ckpt_x.pt")
    assert other.load_state_dict(saved, "ckpt_x.pt", strict=False) == []   # a branch: fresh


# ------------------------------------------------------------------------------- train.py

def all_methods(**overrides):
    hp = {k: v for method in HPARAMS.values() for k, v in method.items()}
    return dict(averaging=ALL, **hp, **overrides)


def test_averaging_never_changes_training(make_config, tmp_path):
    common = dict(max_iters=STEPS, eval_interval=4, log_interval=1, dropout=0.1)
    plain = train.train(make_config(out_dir=str(tmp_path / "plain"), averaging="", **common))
    averaged = train.train(make_config(out_dir=str(tmp_path / "avg"), snapshot_interval=5,
                                       save_averaged=True, **all_methods(**common)))
    assert plain["val_loss_averaged"] == {} and averaged["val_loss_averaged"].keys() == \
        set(AVERAGERS)

    def losses(name):
        rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        return [(r["iter"], r.get("loss"), r.get("train_loss"), r.get("val_loss")) for r in rows]
    assert losses("plain") == losses("avg")   # bitwise: the same floats
    a = checkpoint.read_checkpoint(checkpoint.latest_resume(tmp_path / "plain"))
    b = checkpoint.read_checkpoint(checkpoint.latest_resume(tmp_path / "avg"))
    for name in a.weights:
        assert torch.equal(a.weights[name], b.weights[name]), name


def test_saved_averages_are_the_averager_state_and_evaluate_as_logged(make_config, tmp_path):
    cfg = make_config(max_iters=STEPS, eval_interval=STEPS, snapshot_interval=5,
                      save_averaged=True, **all_methods())
    summary = train.train(cfg)
    out = tmp_path / "out"
    ckpt = checkpoint.read_checkpoint(checkpoint.latest_resume(out))
    assert ckpt.averaging.keys() == set(AVERAGERS)
    for name in AVERAGERS:
        # every method has started by step 5: saved with the snapshots (5, 10) and at the end
        files = [p.name for p in checkpoint.list_snapshots(out / "averaged" / name)]
        assert files == [f"step_{s:07d}.safetensors" for s in (5, 10, STEPS)], name
    # the final BEMA file holds exactly the averager's output, in the model's layout
    record = checkpoint.read_checkpoint(checkpoint.snapshot_path(out / "averaged" / "bema",
                                                                 STEPS))
    state = record.weights
    assert record.step == STEPS
    model = GPT(GPTConfig(**record.model_args))
    flat = FlatParameters(model)
    checkpoint.load_model_state(model, state, "bema")
    assert torch.equal(flat.buffer, ckpt.averaging["bema"]["tensors"]["out"])
    # and evaluating it reproduces the logged val_loss/bema
    runtime = init_runtime(cfg.device, cfg.dtype)
    loss = evaluate_loss(model, open_dataset(cfg.dataset, cfg.data_dir), eval_batches(cfg),
                         runtime, splits=("val",))["val"]
    assert loss == summary["val_loss_averaged"]["bema"]
