"""train.py's post-hoc EMA profiles: phema averagers of the stored widths, written with every
snapshot to out_dir/posthoc/ (one safetensors file per step), in the resume checkpoint and
continued bit for bit, never saved non-finite, with errors that name the keys. (Sharding
under DDP: tests/test_processes.py; the reconstruction from them: tests/test_average.py.)"""

from pathlib import Path

import pytest
import torch

import train
from averaging import sigma_rel_to_gamma
from model import GPT, GPTConfig
from wagpt import checkpoint
from wagpt.configurator import load_config
from wagpt.errors import ConfigError
from wagpt.flat_params import FlatParameters
from wagpt.trainer import NonFiniteLossError, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def files(out, folder):
    return [p.name for p in checkpoint.list_snapshots(out / folder)]


def flat_of(record, state):
    flat = FlatParameters(GPT(GPTConfig(**record.model_args)))
    return flat.flat_from_state(state, record.path)


def test_profiles_are_phema_averagers_written_with_every_snapshot(make_config, tmp_path):
    """Stored from the first snapshot after their burn-in on (at step 0 a profile is still the
    copy of θ_0); the stored 0.1 profile is the phema averager of that width, bit for bit (the
    same one --averaging=phema keeps), and the final file holds the checkpoint's state."""
    cfg = make_config(max_iters=8, snapshot_interval=2, averaging="phema", phema_sigma_rel=0.1,
                      save_averaged=True)
    train.train(cfg)
    out = tmp_path / "out"
    assert files(out, "posthoc") == [f"step_{s:07d}.safetensors" for s in (2, 4, 6, 8)]
    assert files(out, "snapshots")[0] == "step_0000000.safetensors"
    record = checkpoint.read_posthoc(checkpoint.snapshot_path(out / "posthoc", 8))
    assert record.step == 8 and record.tokens_seen == 8 * 4 * 16
    assert [(p["name"], p["sigma_rel"], p["update_after"], p["update_freq"], p["last_update"])
            for p in record.profiles] == [("sigma_rel=0.05", 0.05, 0, 1, 8),
                                          ("sigma_rel=0.1", 0.1, 0, 1, 8)]
    assert record.profiles[0]["gamma"] == sigma_rel_to_gamma(0.05)
    online = checkpoint.read_checkpoint(checkpoint.snapshot_path(out / "averaged" / "phema", 8))
    for key, tensor in online.weights.items():
        assert torch.equal(record.weights["sigma_rel=0.1"][key], tensor), key
    resume = checkpoint.read_checkpoint(checkpoint.latest_resume(out))
    for name in ("sigma_rel=0.05", "sigma_rel=0.1"):
        assert resume.posthoc[name]["step"] == 8
        assert torch.equal(flat_of(record, record.weights[name]),
                           resume.posthoc[name]["tensors"]["e"])


def test_resume_continues_the_profiles_bit_for_bit(make_config, tmp_path):
    common = dict(max_iters=10, ckpt_interval=3, snapshot_interval=2, dropout=0.1,
                  posthoc_sigma_rel=(0.05, 0.1, 0.2), posthoc_update_after=1,
                  posthoc_update_freq=2)
    train.train(make_config(out_dir=str(tmp_path / "once"), **common))
    train.train(make_config(out_dir=str(tmp_path / "twice"), stop_iter=5, **common))
    train.train(make_config(out_dir=str(tmp_path / "twice"), init_from="resume", **common))
    once, twice = tmp_path / "once" / "posthoc", tmp_path / "twice" / "posthoc"
    assert files(once, ".") == files(twice, ".") == \
        [f"step_{s:07d}.safetensors" for s in (4, 6, 8, 10)]   # after τ = 1, every 2 steps
    for name in files(once, "."):   # (not the bytes: safetensors orders metadata at random)
        a, b = checkpoint.read_posthoc(once / name), checkpoint.read_posthoc(twice / name)
        assert (a.step, a.tokens_seen, a.profiles) == (b.step, b.tokens_seen, b.profiles)
        for profile in a.weights:
            for key, tensor in a.weights[profile].items():
                assert torch.equal(tensor, b.weights[profile][key]), (name, profile, key)
    record = checkpoint.read_posthoc(once / "step_0000004.safetensors", tensors=False)
    assert [p["last_update"] for p in record.profiles] == [3, 3, 3]   # acts at 1, 3, 5, ...
    a = checkpoint.read_checkpoint(checkpoint.latest_resume(tmp_path / "once")).posthoc
    b = checkpoint.read_checkpoint(checkpoint.latest_resume(tmp_path / "twice")).posthoc
    assert a.keys() == b.keys() == {"sigma_rel=0.05", "sigma_rel=0.1", "sigma_rel=0.2"}
    for name in a:
        assert a[name]["step"] == b[name]["step"] == 9
        assert torch.equal(a[name]["tensors"]["e"], b[name]["tensors"]["e"]), name


@pytest.mark.parametrize("overrides", [dict(snapshot_interval=0),
                                       dict(snapshot_interval=4, posthoc_sigma_rel=None),
                                       dict(snapshot_interval=4, posthoc_sigma_rel=())])
def test_no_profiles_without_snapshots_or_widths(make_config, tmp_path, overrides):
    train.train(make_config(max_iters=4, **overrides))
    assert not (tmp_path / "out" / "posthoc").exists()
    assert checkpoint.read_checkpoint(checkpoint.latest_resume(tmp_path / "out")).posthoc == {}


@pytest.mark.parametrize("args, match", [
    (["--posthoc_sigma_rel=[0.05,0.5]"], r"posthoc_sigma_rel=\(0.05, 0.5\): 0.5 is not a width"),
    (["--posthoc_sigma_rel=[0.05,0.05]"], "lists 0.05 twice"),
    (["--posthoc_sigma_rel=[0]"], "0.0 is not a width"),
    (["--posthoc_sigma_rel=0.05"], "posthoc_sigma_rel must be a tuple"),
    (["--posthoc_update_freq=0"], "posthoc_update_freq=0"),
    (["--posthoc_update_after=-1"], "posthoc_update_after=-1"),
])
def test_bad_profile_settings_name_the_key(args, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, args)


def test_a_branch_off_a_snapshot_starts_the_profiles_where_told(make_config, tmp_path):
    train.train(make_config(out_dir=str(tmp_path / "a"), snapshot_interval=4, averaging=""))
    snap = checkpoint.snapshot_path(tmp_path / "a" / "snapshots", 4)
    with pytest.raises(ConfigError, match="--posthoc_update_after=4 .* --posthoc_sigma_rel=None"):
        train.train(make_config(out_dir=str(tmp_path / "b"), init_from=str(snap),
                                snapshot_interval=2, averaging=""))
    train.train(make_config(out_dir=str(tmp_path / "b"), init_from=str(snap), snapshot_interval=2,
                            averaging="", posthoc_update_after=4))
    assert files(tmp_path / "b", "posthoc") == ["step_0000006.safetensors",
                                                 "step_0000008.safetensors"]


def test_a_non_finite_profile_is_never_saved(make_config, monkeypatch):
    """The finite check before every save covers the profiles' state too."""
    real = train.build

    def poisoned(*args):
        run = real(*args)
        posthoc = run.posthoc
        update = posthoc.update

        def update_then_poison(step):
            update(step)
            if step == 6:
                posthoc.averagers["sigma_rel=0.1"].e[0] = float("nan")
        posthoc.update = update_then_poison
        return run
    monkeypatch.setattr(train, "build", poisoned)
    cfg = make_config(max_iters=12, snapshot_interval=4, ckpt_interval=4, log_interval=100,
                      eval_interval=100, averaging="")
    with pytest.raises(NonFiniteLossError, match="averager state are not finite at step 8"):
        train.train(cfg)
    out = Path(cfg.out_dir)
    assert files(out, "posthoc") == ["step_0000004.safetensors"]
    assert [p.name for p in checkpoint.list_resume_checkpoints(out)] == ["ckpt_0000004.pt"]
