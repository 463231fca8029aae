"""average.py: one pass serving every method and setting, equal to the online averagers, over
this project's snapshots and nanoGPT checkpoints, with clear errors for bad input; phema
reconstructed from the stored post-hoc profiles; state in host memory and settings split over
processes, with the results of the plain pass."""

import csv
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import average
import train
from averaging import AVERAGERS, build_averager, sigma_rel_to_gamma
from model import GPT, GPTConfig
from wagpt import checkpoint, offline_averaging, posthoc
from wagpt.configurator import load_config, main
from wagpt.dataloader import EvalBatches, evaluate_loss, open_dataset
from wagpt.errors import CheckpointError, ConfigError, UserError
from wagpt.flat_params import FlatParameters
from wagpt.host_state import HostStateAverager
from wagpt.offline_averaging import AverageConfig
from wagpt.runtime import Runtime, init_runtime
from wagpt.trainer import Checkpointer, TrainConfig, build, load_start

REPO = Path(__file__).resolve().parent.parent

STEPS = 8
# every method; online and offline get the same hyperparameters (period 1 = every snapshot)
SAME = dict(ema_decay=0.8, ema_warmup=True, bema_lag=2.0, bema_update_freq=1, dema_lag=3.0,
            ouema_lag=1.0,
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
        ema_update_after=0, wa_start=0, lawa_start=0))   # offline burn-ins default to the
                                                         # first snapshot, 0
    return out


def config(run_dir, tiny_data_dir, tmp_path, ckpt_dir=None, **overrides):
    """average.py over the run's snapshots; phema replayed over them (the run also stored
    post-hoc profiles, which the tests of the reconstruction below use)."""
    base = dict(ckpt_dir=str(ckpt_dir or run_dir / "snapshots"), out_dir=str(tmp_path / "avg"),
                data_dir=str(tiny_data_dir), eval_iters=2, batch_size=4, device="cpu",
                methods=ALL, plot=False, phema_source="snapshots", **SAME)
    return AverageConfig(**{**base, **overrides})


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def test_offline_equals_online_averaging(run_dir, tiny_data_dir, tmp_path):
    """One math, two drivers: with a snapshot at every step, the offline averagers end in the
    online ones' state (the same functions over the same θ_s; float32 rounding of the safetensors
    round trip aside, which is exact)."""
    summary = average.average(config(run_dir, tiny_data_dir, tmp_path))
    online = checkpoint.read_checkpoint(checkpoint.latest_resume(run_dir)).averaging
    offline = {a.name: a for a in summary["averagers"].values()}
    assert set(online) == set(offline) == set(ALL.split(","))
    assert "phema[phema_source=snapshots]" in summary["averagers"]   # the label says the source
    for name, averager in offline.items():
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
        "--methods=bema,lawa", "--bema_update_freq=1", "--bema_ema_power=[0.2,0.5]",
        "--bema_bias_power=[-1,0.2,0.4]",
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
    cfg, start = load_start(cfg)
    run = build(cfg, runtime, data)
    Checkpointer(run, cfg, runtime).load(start)
    model = run.model
    assert run.state.iter_num == 6
    batches = EvalBatches(eval_iters=2, block_size=16, batch_size=4, seed=1337)
    loss = evaluate_loss(model, data, batches, runtime, splits=("val",))["val"]
    assert loss == pytest.approx(saved["val_loss"], abs=1e-6)


# ------------------------------------------------------------------------------ bad input

def copy_snapshots(run_dir, directory, steps=(0, 1, 2, 3)):
    directory.mkdir(parents=True)
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
    with pytest.raises(CheckpointError, match="does not exist"):
        average.average(config(run_dir, tiny_data_dir, tmp_path, ckpt_dir=tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="holds no checkpoints"):
        average.average(config(run_dir, tiny_data_dir, tmp_path, ckpt_dir=tmp_path / "empty"))
    twice = copy_snapshots(run_dir, tmp_path / "twice")
    torch.save({"model": {}, "model_args": {}, "iter_num": 2}, twice / "ckpt_x.pt")
    with pytest.raises(CheckpointError, match="both step 2"):
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
    from wagpt.embedding_metrics import embedding_metrics
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


# ---------------------------------------------------------------------- post-hoc EMA (phema)
# The run above also stored the post-hoc profiles σ_rel 0.05 and 0.1 at every step (train.py's
# default with snapshots on) and tracked phema σ_rel 0.05 online.

def stored_flat(run_dir, step):
    """[(t, γ, flat tensor)] of the stored profiles in the files up to `step`, in file order."""
    model = GPT(GPTConfig(**checkpoint.read_checkpoint(
        checkpoint.snapshot_path(run_dir / "snapshots", 0), tensors=False).model_args))
    flat = FlatParameters(model)
    out = []
    for path in checkpoint.list_snapshots(run_dir / "posthoc"):
        record = checkpoint.read_posthoc(path)
        if record.step <= step:
            out += [(info["last_update"] - info["update_after"], info["gamma"],
                     flat.flat_from_state(record.weights[info["name"]], path))
                    for info in record.profiles]
    return out, flat, model


def saved_flat(summary, flat):
    record = checkpoint.read_checkpoint(summary["saved"]["path"])
    return flat.flat_from_state(record.weights, record.path)


def test_phema_from_the_stored_profiles_is_the_solved_synthesis(run_dir, tiny_data_dir,
                                                                tmp_path):
    """average.py's reconstruction equals posthoc.synthesize over the stored tensors with
    solve_coefficients' coefficients (the float64 reference), bit for bit, and evaluates and
    reports its profile error as such; a stored width is the phema tracked directly."""
    label = "phema[phema_source=profiles,phema_sigma_rel=0.02]"
    summary = average.average(config(run_dir, tiny_data_dir, tmp_path, methods="phema",
                                     phema_source="profiles", phema_sigma_rel=[0.02, 0.05, 0.2],
                                     save=label, save_step=6))
    stored, flat, model = stored_flat(run_dir, 6)
    target = (6, sigma_rel_to_gamma(0.02))
    coeffs = posthoc.solve_coefficients([(t, g) for t, g, _ in stored], target)
    expected = posthoc.synthesize(coeffs, [x for _, _, x in stored])
    assert torch.equal(saved_flat(summary, flat), expected)
    row = next(r for r in summary["rows"] if r["setting"] == label and r["step"] == 6)
    assert row["source"] == "profiles" and row["method"] == "phema"
    assert row["reconstruction_error"] == pytest.approx(posthoc.reconstruction_error(
        [(t, g) for t, g, _ in stored], target, coeffs), rel=1e-9)
    with flat.swapped(expected):
        runtime = init_runtime("cpu")
        loss = evaluate_loss(model, open_dataset("x", str(tiny_data_dir)),
                             EvalBatches(eval_iters=2, batch_size=4, block_size=16, seed=1337),
                             runtime, splits=("val",))["val"]
    assert row["val_loss"] == pytest.approx(loss, abs=1e-6)
    # no reconstruction at step 0 (no profile has averaged anything); every width after it
    assert {r["step"] for r in summary["rows"] if r["source"] == "profiles"} == \
        set(range(1, STEPS + 1))
    # σ_rel 0.05 is stored: its reconstruction is the phema tracked online, to float32 rounding
    again = average.average(config(run_dir, tiny_data_dir, tmp_path, methods="phema",
                                   phema_source="profiles", save="phema", save_step=STEPS,
                                   out_dir=str(tmp_path / "stored_width")))
    online = checkpoint.read_checkpoint(checkpoint.latest_resume(run_dir)).averaging["phema"]
    assert online["hparams"]["phema_sigma_rel"] == 0.05
    torch.testing.assert_close(saved_flat(again, flat), online["tensors"]["e"], rtol=0,
                               atol=2e-6)
    assert again["rows"][-1]["reconstruction_error"] < 1e-7


def test_the_post_hoc_sweep_command_prints_and_plots_every_width(run_dir, tiny_data_dir,
                                                                  tmp_path, capsys):
    """`python average.py --methods=phema --phema_sigma_rel=[0.02,0.05,0.1,0.2]` over a run
    that stored profiles: by default (phema_source=auto) the reconstruction, every width in
    the table, the plot and results.csv, next to the raw weights."""
    out = tmp_path / "sweep"
    main(AverageConfig, average.average, average.__doc__, [
        f"--ckpt_dir={run_dir / 'snapshots'}", f"--out_dir={out}", f"--data_dir={tiny_data_dir}",
        "--eval_iters=2", "--batch_size=4", "--device=cpu", "--methods=phema",
        "--phema_sigma_rel=[0.02,0.05,0.1,0.2]", "--eval_every=4"])
    printed = capsys.readouterr().out
    labels = [f"phema[phema_source=profiles,phema_sigma_rel={w}]" for w in (0.02, 0.05, 0.1, 0.2)]
    assert "post-hoc profiles: 8 files" in printed
    assert "post-hoc EMA from the stored profiles, step 8:" in printed
    assert all(f"| {label} |" in printed for label in labels)
    assert "| phema (profiles) |" in printed
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["setting"] for r in rows} == {"raw", *labels}
    assert {r["source"] for r in rows} == {"snapshots", "profiles"}
    assert all(float(r["reconstruction_error"]) >= 0 for r in rows if r["source"] == "profiles")
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "results.json").read_text())
    assert [w["setting"] for w in record["posthoc"]] == labels


def test_auto_source_and_both_sources(run_dir, tiny_data_dir, tmp_path):
    """auto: the stored profiles when the run has them, else the snapshots; both on request,
    as separate settings that say their source."""
    copied = copy_snapshots(run_dir, tmp_path / "snapshots_elsewhere" / "snapshots")
    replay = average.average(config(run_dir, tiny_data_dir, tmp_path, ckpt_dir=copied,
                                    methods="phema", phema_source="auto"))
    assert {r["setting"] for r in replay["rows"]} == {"raw", "phema[phema_source=snapshots]"}
    both = average.average(config(run_dir, tiny_data_dir, tmp_path, methods="phema",
                                  phema_source="profiles,snapshots", overwrite=True))
    at_last = {r["setting"]: r for r in both["rows"] if r["step"] == STEPS}
    assert set(at_last) == {"raw", "phema[phema_source=profiles]",
                            "phema[phema_source=snapshots]"}
    # with a snapshot at every step the replay is the online phema; the reconstruction of a
    # stored width is too: the two losses agree to float32 rounding
    assert at_last["phema[phema_source=profiles]"]["val_loss"] == pytest.approx(
        at_last["phema[phema_source=snapshots]"]["val_loss"], abs=1e-5)
    assert sorted((b["method"], b["source"]) for b in both["best"]) == [
        ("phema", "profiles"), ("phema", "snapshots"), ("raw", "snapshots")]


def test_posthoc_profiles_selects_the_stored_widths(run_dir, tiny_data_dir, tmp_path):
    """Only the selected stored profiles enter: from the files of steps 4 and 8, σ_rel 0.05 at
    step 8 is the stored one itself (error 0), but from the 0.1 profiles alone it is not, and
    the reported error says so."""
    sparse = tmp_path / "sparse_posthoc"
    sparse.mkdir()
    for step in (4, 8):
        path = checkpoint.snapshot_path(run_dir / "posthoc", step)
        (sparse / path.name).write_bytes(path.read_bytes())
    error = {}
    for name, selected in (("both", None), ("alone", [0.1])):
        summary = average.average(config(run_dir, tiny_data_dir, tmp_path, methods="phema",
                                         phema_source="profiles", posthoc_dir=str(sparse),
                                         posthoc_profiles=selected, eval_every=4,
                                         out_dir=str(tmp_path / name)))
        error[name] = summary["rows"][-1]["reconstruction_error"]
        assert [r["step"] for r in summary["rows"] if r["source"] == "profiles"] == [4, 8]
    assert error["both"] < 1e-7 and error["alone"] > 1e-3


@pytest.mark.parametrize("missing", [[8], [5, 6, 7, 8]])
def test_a_step_no_stored_profile_reaches_is_refused_or_left_out(missing, run_dir, tiny_data_dir,
                                                                tmp_path):
    """The last profile deleted, or profiles that stop at step 4 while the snapshots go on:
    every later step used to report (and --save to write) an average of older profiles."""
    profiles = tmp_path / "posthoc"
    profiles.mkdir()
    for path in checkpoint.list_snapshots(run_dir / "posthoc"):
        if int(path.stem[5:]) not in missing:
            (profiles / path.name).write_bytes(path.read_bytes())
    kept = [s for s in range(1, STEPS + 1) if s not in missing]
    cfg = config(run_dir, tiny_data_dir, tmp_path, methods="phema", phema_source="profiles",
                 posthoc_dir=str(profiles))
    with pytest.raises(ConfigError, match=f"do not reach steps {', '.join(map(str, missing))}, "
                                          f"where a phema could only be built from older "
                                          f"profiles; the steps that can be reconstructed are "
                                          f"{', '.join(map(str, kept))}\\. Replay"):
        average.average(cfg)
    with pytest.warns(UserWarning, match=f"do not reach steps {', '.join(map(str, missing))}"):
        summary = average.average(dataclasses.replace(cfg, skip_bad=True))
    assert [r["step"] for r in summary["rows"] if r["source"] == "profiles"] == kept


@pytest.mark.parametrize("overrides, match", [
    (dict(phema_update_after=2), "phema_update_after=2, but the stored post-hoc profiles"),
    (dict(phema_update_freq=2), "phema_update_freq=2, but the stored post-hoc profiles"),
    (dict(posthoc_profiles=[0.07]), "no profile of width 0.07 is stored"),
    (dict(posthoc_dir="NOWHERE"), "posthoc_dir=.*NOWHERE does not exist"),
])
def test_bad_reconstruction_settings_are_named(run_dir, tiny_data_dir, tmp_path, overrides,
                                               match):
    if "posthoc_dir" in overrides:
        overrides = dict(posthoc_dir=str(tmp_path / "NOWHERE"))
    with pytest.raises(UserError, match=match):
        average.average(config(run_dir, tiny_data_dir, tmp_path, methods="phema",
                               phema_source="profiles", **overrides))


@pytest.mark.parametrize("args, match", [
    (["--phema_source=profiles"],
     "error: phema_source='profiles', but there are no stored post-hoc profiles in .*"
     "--posthoc_sigma_rel=.*--phema_source=snapshots"),
    (["--phema_sigma_rel=[0.02,0.5]"], "error: phema_sigma_rel=0.5: must be a finite number"),
    (["--phema_source=profile"], "error: phema_source='profile': 'profile' is unknown"),
    (["--phema_source=auto,profiles"], "error: phema_source='auto,profiles': 'auto' stands"),
    (["--state_device=gpu"], "error: state_device='gpu'"),
])
def test_bad_post_hoc_input_is_one_line(run_dir, tiny_data_dir, tmp_path, args, match):
    snaps = copy_snapshots(run_dir, tmp_path / "snaps")   # no posthoc/ beside it
    result = subprocess.run(
        [sys.executable, "average.py", f"--ckpt_dir={snaps}", f"--out_dir={tmp_path / 'o'}",
         f"--data_dir={tiny_data_dir}", "--device=cpu", "--methods=phema", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert re.match(match, result.stderr.strip()), result.stderr


# --------------------------------------------------------------- host state and processes

def test_host_state_gives_the_results_of_device_state_bit_for_bit(run_dir, tiny_data_dir,
                                                                  tmp_path):
    """Every method (with a LAWA and a BEMA sweep) and the reconstruction, their state in
    chunks of 100 parameters streamed through the device (on the CPU the copies are no-ops and
    the chunking is what is tested): the same rows, the same final state."""
    common = dict(methods=ALL, phema_source="profiles,snapshots", lawa_k=[2, 3],
                  bema_bias_power=[-1.0, 0.2], eval_every=3)
    device = average.average(config(run_dir, tiny_data_dir, tmp_path, state_device="device",
                                    out_dir=str(tmp_path / "device"), **common))
    host = average.average(config(run_dir, tiny_data_dir, tmp_path, state_device="host",
                                  state_chunk=100, out_dir=str(tmp_path / "host"), **common))
    assert host["rows"] == device["rows"]
    assert any(r["source"] == "profiles" for r in host["rows"])
    assert host["averagers"].keys() == device["averagers"].keys()
    for label, averager in host["averagers"].items():
        assert isinstance(averager, HostStateAverager) and len(averager.parts) > 100
        a, b = averager.state_dict(), device["averagers"][label].state_dict()
        assert (a["step"], a["counters"], a["numel"]) == (b["step"], b["counters"], b["numel"])
        for key, tensor in b["tensors"].items():
            assert torch.equal(a["tensors"][key], tensor), (label, key)


@pytest.mark.parametrize("chunk", [997, 1000, 4099])
def test_host_state_equals_device_state_bit_for_bit_for_every_method(chunk):
    """Every registered method, chunks that do not divide the 30011 parameters: the average and
    the state equal those of one averager over the whole vector, bit for bit, at every step
    (LAWA's mean of 5 copies used to differ in up to 0.3% of the entries)."""
    numel, steps = 30011, 12
    g = torch.Generator().manual_seed(chunk)
    trajectory = torch.randn(steps, numel, generator=g).cumsum(0)
    for name, cls in AVERAGERS.items():
        hparams = {**cls.defaults, cls.start_key: 0, cls.freq_key: 1}
        hparams.update({"lawa": dict(lawa_k=5), "wa": dict(wa_horizon=2, wa_windows=5)}.get(
            name, {}))

        def build(name=name, hparams=hparams):
            return build_averager(name, allow_gaps=True, **hparams)
        whole, host = build(), HostStateAverager(build, numel, torch.device("cpu"), chunk)
        for step in range(steps):
            whole.update(step, trajectory[step])
            host.update(step, trajectory[step])
            assert torch.equal(host.average(), whole.average()), (name, step)
        a, b = host.state_dict(), whole.state_dict()
        assert all(torch.equal(a["tensors"][k], v) for k, v in b["tensors"].items()), name


def test_two_gloo_ranks_give_one_process_results(run_dir, tiny_data_dir, tmp_path):
    """torchrun --nproc_per_node=2 average.py: the settings split over the ranks, rank 0 writes
    results.csv/json equal to one process's (every row, exactly) and the chosen --save."""
    args = [f"--ckpt_dir={run_dir / 'snapshots'}", f"--data_dir={tiny_data_dir}",
            "--eval_iters=2", "--batch_size=4", "--device=cpu", "--plot=False",
            f"--methods={ALL}", "--phema_source=profiles,snapshots",
            "--phema_sigma_rel=[0.03,0.05]", "--lawa_k=[2,3]", "--ema_decay=[0.5,0.8]",
            "--eval_every=2", "--save=best", "--save_step=6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "average.py", f"--out_dir={tmp_path / 'one'}", *args],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "average.py", f"--out_dir={tmp_path / 'two'}",
                          *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "over 2 processes" in two.stdout and two.stdout.count("| method |") == 1
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert a["rows"] == b["rows"] and a["best"] == b["best"] and a["saved"] == {
        **b["saved"], "path": b["saved"]["path"].replace("/two/", "/one/")}
    assert len(b["timing"]) == 2 and len(a["timing"]) == 1
    assert (tmp_path / "one" / "results.csv").read_text() == \
        (tmp_path / "two" / "results.csv").read_text()
    x, y = (checkpoint.read_checkpoint(p["saved"]["path"]).weights for p in (a, b))
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_ranks_share_the_work_and_own_every_setting():
    cfg = AverageConfig(ckpt_dir="x", methods="lawa,ema,bema", lawa_k=[2, 9],
                        ema_decay=[0.5, 0.6, 0.7], bema_bias_power=[-1.0, 0.2])
    settings = offline_averaging.expand_settings(cfg, first_step=0)
    owner = offline_averaging.assign_ranks(settings, 3)
    assert set(owner) == {"raw"} | {s.label for s in settings}
    assert set(owner.values()) == {0, 1, 2}
    assert owner == offline_averaging.assign_ranks(settings, 3)   # the same on every rank
    assert offline_averaging.assign_ranks(settings, 1) == dict.fromkeys(owner, 0)
    # each item weighs an evaluation plus its state copies; the loads differ by less than the
    # heaviest item (lawa_k=9: 10)
    weight = {"raw": 1, **{s.label: 1 + build_averager(s.method, **s.hparams).state_copies()
                           for s in settings}}
    load = [sum(w for label, w in weight.items() if owner[label] == r) for r in range(3)]
    assert max(load) - min(load) < max(weight.values())


def test_auto_puts_the_state_in_host_memory_when_the_device_is_too_small(monkeypatch, capsys):
    cfg = AverageConfig(ckpt_dir="x", methods="lawa", lawa_k=[5, 10])
    settings = offline_averaging.expand_settings(cfg, first_step=0)
    gpu = Runtime(torch.device("cuda", 0))
    model_args = dict(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=32, bias=False,
                      dropout=0.0)
    free = {"cuda": 10**6, "cpu": 10**12}   # 1 MB on the GPU: not even the model
    monkeypatch.setattr(offline_averaging, "available_memory", lambda device: free[device.type])
    assert offline_averaging.check_memory(model_args, settings, gpu, cfg).state == "host"
    assert "pinned host memory" in capsys.readouterr().out
    free["cuda"] = 10**12
    assert offline_averaging.check_memory(model_args, settings, gpu, cfg).state == "device"
    free["cuda"] = 10**6
    with pytest.raises(ConfigError, match="cuda:0 has 0.0 GiB .* --state_device=host"):
        offline_averaging.check_memory(model_args, settings, gpu, dataclasses.replace(
            cfg, state_device="device"))


@pytest.mark.parametrize("device, state", [("cpu", "device"), ("cuda", "host")])
def test_the_processes_of_one_host_share_its_memory(device, state, monkeypatch, capsys):
    """2 processes x 11.5 GiB used to pass against 21.9 GiB free: each share was compared
    with the whole host's memory (the CPU as the device, or the state in host memory)."""
    cfg = AverageConfig(ckpt_dir="x", methods="lawa", lawa_k=[5, 6], state_device=state)
    settings = offline_averaging.expand_settings(cfg, first_step=0)
    model_args = dict(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=32, bias=False,
                      dropout=0.0)
    numel = sum(p.numel() for p in GPT(GPTConfig(**model_args)).parameters())
    one_share = 4 * numel * 8   # lawa_k=5 or 6, + model, swap, temporary on the CPU: < 9 copies
    monkeypatch.setattr(offline_averaging, "available_memory", lambda d: int(1.2 * one_share))
    for host_size, fits in ((1, True), (2, False)):   # 2 hosts of 1 process, or 1 host of 2
        runtime = Runtime(torch.device(device, 0) if device == "cuda" else torch.device("cpu"),
                          rank=1, local_rank=host_size - 1, world_size=2,
                          local_world_size=host_size)
        owner = offline_averaging.assign_ranks(settings, 2)
        mine = [s for s in settings if owner[s.label] == 1]
        neighbours = offline_averaging.host_neighbours(settings, owner, runtime)
        assert len(neighbours) == host_size - 1
        check = lambda: offline_averaging.check_memory(model_args, mine, runtime, cfg,  # noqa
                                                       neighbours=neighbours)
        if fits:
            check()
        else:
            with pytest.raises(ConfigError, match="\\(shared by this host's 2 processes\\) "
                                                  "has .* more hosts"):
                check()


@pytest.mark.parametrize("offline_time, per_snapshot", [("steps", 0.8 ** 2), ("snapshots", 0.8)])
def test_offline_time_is_training_steps_unless_told(run_dir, tiny_data_dir, tmp_path,
                                                    offline_time, per_snapshot):
    """Over snapshots every 2 steps, --ema_decay=0.8 decays by 0.8² per snapshot (the online
    EMA's two steps), or with --offline_time=snapshots by 0.8 (one update per snapshot)."""
    every_2 = copy_snapshots(run_dir, tmp_path / "every_2", steps=(0, 2, 4, 6, 8))
    summary = average.average(config(run_dir, tiny_data_dir, tmp_path, ckpt_dir=every_2,
                                     methods="ema", ema_decay=0.8, ema_warmup=False,
                                     offline_time=offline_time))
    model = GPT(GPTConfig(**{**checkpoint.read_checkpoint(
        every_2 / "step_0000000.safetensors", tensors=False).model_args, "dropout": 0.0}))
    flat = FlatParameters(model)
    expected = None
    for path in checkpoint.list_snapshots(every_2):
        checkpoint.load_model_state(model, checkpoint.read_checkpoint(path).weights, path)
        theta = flat.buffer.detach().double().clone()
        expected = theta if expected is None else \
            per_snapshot * expected + (1 - per_snapshot) * theta
    got = summary["averagers"]["ema"].average().double()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("offline_time, phi", [("steps", 400), ("snapshots", 1)])
def test_periods_not_given_are_every_snapshot_but_bemas(offline_time, phi):
    """BEMA's period is part of its estimate: with time in steps it keeps train.py's default; the
    others (and BEMA with one update per snapshot) act at every snapshot."""
    cfg = AverageConfig(ckpt_dir="x", methods="bema,ema,lawa,swa", offline_time=offline_time)
    hparams = {s.method: s.hparams for s in offline_averaging.expand_settings(cfg, first_step=3)}
    assert hparams["bema"]["bema_update_freq"] == phi
    assert hparams["bema"]["bema_update_after"] == 3 == hparams["lawa"]["lawa_start"]
    assert hparams["ema"]["ema_update_freq"] == hparams["lawa"]["lawa_interval"] == \
        hparams["swa"]["swa_freq"] == 1


def test_settings_are_chosen_on_held_out_batches_and_reported_on_others(run_dir, tiny_data_dir,
                                                                        tmp_path):
    """Each method's best setting and --save=best's choice go by the loss on select_iters other
    val batches (seed + 1), measured at the last step and save_step; the reported losses are
    those of the eval batches, so a choice is never judged on the batches that made it."""
    sweep = dict(methods="ema", ema_decay=[0.3, 0.6, 0.9], eval_every=4, save="best",
                 save_step=4, select_iters=3)
    summary = average.average(config(run_dir, tiny_data_dir, tmp_path, **sweep))
    rows = summary["rows"]
    assert {r["step"] for r in rows if r["select_loss"] is not None} == {4, STEPS}
    # the held-out loss is the loss on the batches of seed + 1
    data = open_dataset("x", str(tiny_data_dir))
    model = checkpoint.load_model(checkpoint.snapshot_path(run_dir / "snapshots", STEPS))[0]
    raw = next(r for r in rows if r["step"] == STEPS and r["method"] == "raw")
    held_out = evaluate_loss(model, data, EvalBatches(3, 4, 16, 1337 + 1), Runtime(
        torch.device("cpu")), splits=("val",))["val"]
    assert raw["select_loss"] == pytest.approx(held_out, rel=1e-6) != raw["val_loss"]
    last = [r for r in rows if r["step"] == STEPS and r["method"] == "ema"]
    best = next(b for b in summary["best"] if b["method"] == "ema")
    chosen = min(last, key=lambda r: r["select_loss"])
    assert best["setting"] == chosen["setting"] and best["chosen_on"] == "held-out batches"
    assert best["val_loss"] == chosen["val_loss"]   # reported on the eval batches
    at_save = [r for r in rows if r["step"] == 4 and r["method"] == "ema"]
    saved = min(at_save, key=lambda r: r["select_loss"])
    assert summary["saved"]["label"] == saved["setting"]
    assert summary["saved"]["select_loss"] == saved["select_loss"]
    # off: the choice goes by the reported batches, as before
    summary = average.average(config(run_dir, tiny_data_dir, tmp_path, **{
        **sweep, "select_iters": 0}, out_dir=str(tmp_path / "in_sample")))
    assert all(r["select_loss"] is None for r in summary["rows"])
    best = next(b for b in summary["best"] if b["method"] == "ema")
    assert best["chosen_on"] == "reported batches" and best["setting"] == min(
        last, key=lambda r: r["val_loss"])["setting"]


def test_best_settings_goes_by_the_held_out_loss():
    """A setting better on the held-out batches wins though it is worse on the reported ones."""
    rows = [dict(step=8, method="raw", setting="raw", source="snapshots", val_loss=2.0,
                 select_loss=2.1),
            dict(step=8, method="ema", setting="ema[a]", source="snapshots", val_loss=1.5,
                 select_loss=1.9),
            dict(step=8, method="ema", setting="ema[b]", source="snapshots", val_loss=1.6,
                 select_loss=1.8)]
    best = {b["method"]: b for b in offline_averaging.best_settings(rows)}
    assert best["ema"]["setting"] == "ema[b]" and best["ema"]["gain"] == pytest.approx(0.4)
    for r in rows:
        r["select_loss"] = None
    assert offline_averaging.best_settings(rows)[1]["setting"] == "ema[a]"
