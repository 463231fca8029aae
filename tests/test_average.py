"""average.py: one pass serving every method and setting, equal to the online averagers, over
this project's snapshots and nanoGPT checkpoints, with clear errors for bad input."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

import average
import checkpoint
import train
from average import AverageConfig
from averaging import AVERAGERS
from configurator import ConfigError, load_config
from dataloader import EvalBatches, evaluate_loss, open_dataset
from runtime import init_runtime
from train import TrainConfig

STEPS = 8
# every method; online and offline get the same hyperparameters (period 1 = every snapshot)
SAME = dict(ema_decay=0.8, ema_warmup=True, bema_lag=2.0, dema_lag=3.0, ouema_lag=1.0,
            lawa_k=3, wa_horizon=3, wa_windows=2)
PERIODS = dict(lawa_interval=1, wa_interval=1)
ALL = ",".join(AVERAGERS)   # every registered method


@pytest.fixture(scope="module")
def run_dir(tiny_data_dir, tmp_path_factory):
    """A tiny run with a snapshot at every step 0..8 and every averager online."""
    out = tmp_path_factory.mktemp("run")
    train.train(TrainConfig(
        data_dir=str(tiny_data_dir), out_dir=str(out), n_layer=2, n_head=2, n_embd=32,
        block_size=16, batch_size=4, max_iters=STEPS, eval_interval=STEPS, eval_iters=2,
        log_interval=4, ckpt_interval=STEPS, warmup_iters=2, learning_rate=1e-2, min_lr=1e-3,
        device="cpu", snapshot_interval=1, averaging=ALL, **SAME, **PERIODS,
        ema_update_after=0, wa_start=0))   # offline burn-ins default to the first snapshot, 0
    return out


def config(run_dir, tiny_data_dir, tmp_path, ckpt_dir=None, **overrides):
    base = dict(ckpt_dir=str(ckpt_dir or run_dir / "snapshots"), out_dir=str(tmp_path / "avg"),
                data_dir=str(tiny_data_dir), eval_iters=2, batch_size=4, device="cpu",
                methods=ALL, plot=False, **SAME)
    return AverageConfig(**{**base, **overrides})


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def test_offline_equals_online_averaging(run_dir, tiny_data_dir, tmp_path):
    """One math, two drivers: with a snapshot at every step, the offline averagers end in the
    online ones' state (the same functions over the same θ_s; float32 rounding of the safetensors
    round trip aside, which is exact)."""
    summary = average.average(config(run_dir, tiny_data_dir, tmp_path))
    online = checkpoint.read_checkpoint(checkpoint.latest_resume(run_dir)).averaging
    assert set(online) == set(summary["averagers"]) == set(ALL.split(","))
    for name, averager in summary["averagers"].items():
        offline = averager.state_dict()
        assert offline["step"] == online[name]["step"] == STEPS, name
        assert offline["counters"] == online[name]["counters"], name
        for key, tensor in online[name]["tensors"].items():
            torch.testing.assert_close(offline["tensors"][key], tensor, rtol=1e-6, atol=1e-7,
                                       msg=f"{name}.{key}")


def test_one_pass_reads_each_snapshot_once_and_serves_a_sweep(run_dir, tiny_data_dir, tmp_path,
                                                              monkeypatch):
    reads = []
    real_read = checkpoint.read_checkpoint
    monkeypatch.setattr(checkpoint, "read_checkpoint", lambda path, tensors=True: (
        tensors and reads.append(path.name)) or real_read(path, tensors))
    before = digest(run_dir / "snapshots")
    cfg = load_config(AverageConfig, [
        f"--ckpt_dir={run_dir / 'snapshots'}", f"--out_dir={tmp_path / 'sweep'}",
        f"--data_dir={tiny_data_dir}", "--eval_iters=2", "--batch_size=4", "--device=cpu",
        "--methods=bema,lawa", "--bema_ema_power=[0.2,0.5]", "--bema_bias_power=[-1,0.2,0.4]",
        "--lawa_k=[2,4]", "--eval_every=4"])
    summary = average.average(cfg)
    assert sorted(reads) == sorted(f"step_{s:07d}.safetensors" for s in range(STEPS + 1))
    assert digest(run_dir / "snapshots") == before   # the input is never modified
    labels = {r["setting"] for r in summary["rows"]}
    assert len(labels) == 1 + 6 + 2 and "bema[bema_ema_power=0.2,bema_bias_power=-1]" in labels
    assert sorted({r["step"] for r in summary["rows"]}) == [0, 4, 8]
    # every setting of the sweep equals a run of that setting alone
    alone = average.average(config(run_dir, tiny_data_dir, tmp_path, methods="bema",
                                   bema_ema_power=0.5, bema_bias_power=0.4, bema_lag=10.0,
                                   eval_every=4,
                                   out_dir=str(tmp_path / "alone")))
    swept = {r["step"]: r["val_loss"] for r in summary["rows"]
             if r["setting"] == "bema[bema_ema_power=0.5,bema_bias_power=0.4]"}
    assert swept == {r["step"]: r["val_loss"] for r in alone["rows"] if r["method"] == "bema"}
    # outputs: csv, json, the table's best settings, a plot
    out = tmp_path / "sweep"
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "results.csv").read_text().count("\n") == 1 + 3 * len(labels)   # + header
    record = json.loads((out / "results.json").read_text())
    assert [b["method"] for b in record["best"]] == ["raw", "bema", "lawa"]
    raw_last = [r["val_loss"] for r in summary["rows"] if r["method"] == "raw"][-1]
    for b in record["best"][1:]:
        assert b["gain"] == pytest.approx(raw_last - b["val_loss"])


def test_nanogpt_checkpoints_give_the_same_results(run_dir, tiny_data_dir, tmp_path):
    """A directory of nanoGPT-style files: _orig_mod. prefixes, mask buffers, optimizer state,
    the step from iter_num or from the file name."""
    nano = tmp_path / "nano"
    nano.mkdir()
    for path in checkpoint.list_snapshots(run_dir / "snapshots"):
        record = checkpoint.read_checkpoint(path)
        state, info = record.weights, {"step": record.step, "model_args": record.model_args}
        model = {f"_orig_mod.{k}": v for k, v in state.items()}
        model["_orig_mod.transformer.h.0.attn.bias"] = torch.ones(1, 1, 16, 16).tril()
        ckpt = {"model": model, "model_args": {**info["model_args"],
                                               "scale_attn_by_inverse_layer_idx": False},
                "optimizer": {"state": {}}, "best_val_loss": 1.0}
        if info["step"] % 2:
            ckpt["iter_num"] = info["step"]
            name = f"ckpt_rank0_{info['step']}_final.pt"   # iter_num wins over the digits
        else:
            name = f"ckpt_{info['step']}.pt"
        torch.save(ckpt, nano / name)
    ours = average.average(config(run_dir, tiny_data_dir, tmp_path))
    theirs = average.average(config(run_dir, tiny_data_dir, tmp_path, ckpt_dir=nano,
                                    out_dir=str(tmp_path / "nano_out")))
    assert [(r["step"], r["setting"], r["val_loss"]) for r in ours["rows"]] == \
        [(r["step"], r["setting"], r["val_loss"]) for r in theirs["rows"]]


def test_save_writes_a_checkpoint_train_and_evaluation_accept(run_dir, tiny_data_dir,
                                                              tmp_path):
    summary = average.average(config(run_dir, tiny_data_dir, tmp_path, methods="bema,ema",
                                     bema_bias_power=[0.2, 0.4], save="bema", save_step=6))
    saved = summary["saved"]
    assert saved["step"] == 6 and saved["label"].startswith("bema[")
    rows = {r["setting"]: r["val_loss"] for r in summary["rows"] if r["step"] == 6}
    assert saved["val_loss"] == min(v for k, v in rows.items() if k.startswith("bema"))
    assert checkpoint.read_checkpoint(saved["path"]).step == 6
    # train.py continues from it (branching off an averaged model)
    cfg = TrainConfig(data_dir=str(tiny_data_dir), out_dir=str(tmp_path / "branch"),
                      init_from=saved["path"], max_iters=8, eval_interval=100, eval_iters=2,
                      batch_size=4, device="cpu", averaging="", log_interval=1, warmup_iters=2)
    runtime = init_runtime(cfg.device, cfg.dtype)
    data = open_dataset(cfg.dataset, cfg.data_dir)
    model, _, state_, _, _ = train.build(cfg, runtime, data)
    assert state_.iter_num == 6
    batches = EvalBatches(eval_iters=2, block_size=16, batch_size=4, seed=1337)
    loss = evaluate_loss(model, data, batches, runtime, splits=("val",))["val"]
    assert loss == pytest.approx(saved["val_loss"], abs=1e-6)


# ------------------------------------------------------------------------------ bad input

def copy_snapshots(run_dir, directory, steps=(0, 1, 2, 3)):
    directory.mkdir()
    for s in steps:
        src = checkpoint.snapshot_path(run_dir / "snapshots", s)
        (directory / src.name).write_bytes(src.read_bytes())
    return directory


def corrupt(kind, directory, run_dir):
    """Put one bad file into `directory`; return its name and a phrase of the error."""
    if kind == "truncated":
        path = directory / "step_0000002.safetensors"
        path.write_bytes(path.read_bytes()[:-100])
        return path.name, "truncated or corrupt"
    if kind == "not a checkpoint":
        torch.save({"optimizer": {}}, directory / "optimizer_5.pt")
        return "optimizer_5.pt", "not a model checkpoint"
    if kind == "garbage":
        (directory / "ckpt_0000009.pt").write_bytes(b"not a zip file at all" * 10)
        return "ckpt_0000009.pt", "not a loadable checkpoint"
    if kind == "unsafe":
        import os
        import pickle

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {directory.parent / 'pwned'}",))
        (directory / "ckpt_0000010.pt").write_bytes(pickle.dumps({"model": Evil()}))
        return "ckpt_0000010.pt", "unsafe to"
    if kind in ("another model", "other shapes"):
        record = checkpoint.read_checkpoint(checkpoint.snapshot_path(run_dir / "snapshots", 8))
        state, args = record.weights, record.model_args
        if kind == "another model":
            args = {**args, "n_embd": 64}
        else:   # the same model_args, but the file's tensors do not fit them
            state = {k: torch.zeros(3) for k in state}
        metadata = {"format": checkpoint.SNAPSHOT_FORMAT, "step": "9", "tokens_seen": "0",
                    "model_args": json.dumps(args)}
        save_file(state, directory / "step_0000009.safetensors", metadata=metadata)
        return "step_0000009.safetensors", kind.replace("other shapes", "does not fit")
    raise AssertionError(kind)


KINDS = ["truncated", "not a checkpoint", "garbage", "unsafe", "another model", "other shapes"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_file_is_named_or_skipped_and_nothing_is_modified(kind, run_dir, tiny_data_dir,
                                                                tmp_path):
    directory = copy_snapshots(run_dir, tmp_path / "in")
    name, phrase = corrupt(kind, directory, run_dir)
    before = digest(directory)
    cfg = config(run_dir, tiny_data_dir, tmp_path, ckpt_dir=directory, methods="ema,lawa")
    with pytest.raises(Exception, match=phrase) as error:
        average.average(cfg)
    assert name in str(error.value)
    assert not (tmp_path / "avg" / "results.csv").exists()
    with pytest.warns(UserWarning, match=name):
        summary = average.average(config(run_dir, tiny_data_dir, tmp_path, ckpt_dir=directory,
                                         methods="ema,lawa", skip_bad=True))
    assert [s["file"] for s in summary["skipped"]] == [name]
    assert f"skipped,{name}" in (tmp_path / "avg" / "results.csv").read_text()
    assert digest(directory) == before
    assert not (tmp_path / "pwned").exists()


def test_directory_errors(run_dir, tiny_data_dir, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        average.average(config(run_dir, tiny_data_dir, tmp_path, ckpt_dir=tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoints"):
        average.average(config(run_dir, tiny_data_dir, tmp_path, ckpt_dir=tmp_path / "empty"))
    twice = copy_snapshots(run_dir, tmp_path / "twice")
    torch.save({"model": {}, "model_args": {}, "iter_num": 2}, twice / "ckpt_x.pt")
    with pytest.raises(checkpoint.CheckpointError, match="both step 2"):
        average.average(config(run_dir, tiny_data_dir, tmp_path, ckpt_dir=twice))


@pytest.mark.parametrize("args, match", [
    (["--methods=ema,bemma"], "'bemma' is not an averaging method"),
    (["--bema_ema_power=[0.5,0.5]", "--methods=bema"], "twice"),
    (["--lawa_k=[3,0]", "--methods=lawa"], "lawa_k=0"),
    (["--out_dir=SNAPS/avg"], "inside ckpt_dir"),
    (["--ckpt_dir="], "ckpt_dir is not set"),
])
def test_bad_settings_fail_before_any_work(args, match, run_dir):
    snaps = str(run_dir / "snapshots")
    argv = [f"--ckpt_dir={snaps}"] + [a.replace("SNAPS", snaps) for a in args]
    with pytest.raises(ConfigError, match=match):
        load_config(AverageConfig, argv)


def test_a_burn_in_or_save_step_off_the_trajectory_is_an_error(run_dir, tiny_data_dir,
                                                              tmp_path):
    sparse = copy_snapshots(run_dir, tmp_path / "sparse", steps=(0, 2, 4, 6))
    with pytest.raises(ValueError, match="next snapshot is step 4"):
        average.average(config(run_dir, tiny_data_dir, tmp_path, ckpt_dir=sparse,
                               methods="bema", bema_update_after=3))
    with pytest.raises(ValueError, match="save_step=5"):
        average.average(config(run_dir, tiny_data_dir, tmp_path, ckpt_dir=sparse, save="best",
                               save_step=5))


def test_embedding_metrics_per_averaged_model(run_dir, tiny_data_dir, tmp_path):
    from embedding_metrics import embedding_metrics
    summary = average.average(config(run_dir, tiny_data_dir, tmp_path, methods="ema",
                                     embeddings=True, eval_every=STEPS))
    rows = {(r["step"], r["method"]): r for r in summary["rows"]}
    assert set(rows) == {(0, "raw"), (0, "ema"), (8, "raw"), (8, "ema")}
    # the raw row's metrics are those of the snapshot's embedding matrix
    state = checkpoint.read_checkpoint(checkpoint.snapshot_path(run_dir / "snapshots",
                                                                STEPS)).weights
    expected = embedding_metrics(state["transformer.wte.weight"])
    assert rows[(8, "raw")]["isotropy"] == pytest.approx(expected["isotropy"])
    assert rows[(8, "ema")]["isotropy"] != rows[(8, "raw")]["isotropy"]
    assert "isotropy" in (tmp_path / "avg" / "results.csv").read_text().splitlines()[0]
