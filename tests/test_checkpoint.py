"""wagpt/checkpoint.py: atomic writes, pruning, safe loading, snapshots."""

import math
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wagpt import checkpoint, integrity
from wagpt.errors import CheckpointError


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(7, 4)
        self.head = torch.nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight
        self.norm = torch.nn.LayerNorm(4)


def payload(step, model=None):
    model = model or Tied()
    return {"model": checkpoint.model_state(model), "optimizer": {}, "iter_num": step,
            "tokens_seen": 10 * step, "model_args": {"n_layer": 1}, "config": {"lr": 1e-3}}


def test_save_load_prune(tmp_path):
    for step in (10, 20, 30):
        checkpoint.save_resume(tmp_path, payload(step), keep_last=2)
    names = [p.name for p in checkpoint.list_resume_checkpoints(tmp_path)]
    assert names == ["ckpt_0000020.pt", "ckpt_0000030.pt"]
    ckpt = checkpoint.read_checkpoint(checkpoint.latest_resume(tmp_path))
    assert ckpt.step == 30 and ckpt.kind == "resume"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_interrupted_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save_resume(tmp_path, payload(10), keep_last=1)
    real_save = torch.save

    def crash_midway(obj, f):
        real_save(obj, f)
        f.flush()
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_resume(tmp_path, payload(20), keep_last=1)
    monkeypatch.undo()
    # nothing half-written under a final name, no temp left behind, the old one intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_0000010.pt"]
    assert checkpoint.read_checkpoint(checkpoint.latest_resume(tmp_path)).step == 10


def test_corrupt_and_unsafe_checkpoints_are_refused(tmp_path):
    path = checkpoint.save_resume(tmp_path, payload(10), keep_last=0)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        checkpoint.read_checkpoint(truncated)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(CheckpointError, match="evil.pt"):
        checkpoint.read_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()

    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.read_checkpoint(tmp_path / "nope.pt")


def test_snapshot_round_trip_with_tied_weights(tmp_path):
    model = Tied()
    path = checkpoint.save_snapshot(tmp_path / "snaps", model, step=40, tokens_seen=1234,
                                    model_args={"n_layer": 2})
    assert path.name == "step_0000040.safetensors"
    record = checkpoint.read_checkpoint(path)
    state = record.weights
    assert (record.step, record.tokens_seen, record.model_args) == (40, 1234, {"n_layer": 2})
    assert "head.weight" not in state  # the tied copy is stored once
    fresh = Tied()
    checkpoint.load_model_state(fresh, state, path)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh.head.weight.data_ptr() == fresh.emb.weight.data_ptr()
    assert checkpoint.list_snapshots(tmp_path / "snaps") == [path]


def test_snapshot_corrupt_and_mismatched(tmp_path):
    path = checkpoint.save_snapshot(tmp_path, Tied(), 1, 1, {})
    bad = tmp_path / "step_0000002.safetensors"
    bad.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="step_0000002"):
        checkpoint.read_checkpoint(bad)
    other = torch.nn.Linear(3, 3)
    state = checkpoint.read_checkpoint(path).weights
    with pytest.raises(CheckpointError, match="does not match"):
        checkpoint.load_model_state(other, state, path)


def test_compiled_prefix_is_stripped():
    model = Tied()
    state = {"_orig_mod." + k: v for k, v in checkpoint.model_state(model).items()}
    fresh = Tied()
    checkpoint.load_model_state(fresh, state, "nanogpt-style")
    assert torch.equal(fresh.emb.weight, model.emb.weight)


# ---------------------------------------------------------------------------------------------
# post-hoc EMA profile files

def profile(name, sigma_rel, gamma, last_update):
    return {"name": name, "sigma_rel": sigma_rel, "gamma": gamma, "update_after": 3,
            "update_freq": 2, "last_update": last_update}


def test_posthoc_file_round_trip(tmp_path):
    a, b = Tied(), Tied()
    infos = [profile("sigma_rel=0.05", 0.05, 16.97, 41), profile("sigma_rel=0.1", 0.1, 6.94, 41)]
    path = checkpoint.save_posthoc(tmp_path / "posthoc", [(infos[0], checkpoint.model_state(a)),
                                                          (infos[1], checkpoint.model_state(b))],
                                   step=42, tokens_seen=99, model_args={"n_layer": 2})
    assert path == tmp_path / "posthoc" / "step_0000042.safetensors"
    header = checkpoint.read_posthoc(path, tensors=False)
    assert (header.step, header.tokens_seen, header.model_args, header.profiles, header.weights) \
        == (42, 99, {"n_layer": 2}, infos, None)
    record = checkpoint.read_posthoc(path)
    for info, model in zip(infos, (a, b)):
        state = record.weights[info["name"]]
        assert state.keys() == checkpoint.model_state(model).keys()   # tied weight once
        for key, tensor in checkpoint.model_state(model).items():
            assert torch.equal(state[key], tensor), key
    # safetensors without pickle: any reader sees the tensors under '<profile>/<parameter>'
    from safetensors.torch import load_file
    assert set(load_file(path)) == {f"{i['name']}/{k}" for i in infos
                                    for k in checkpoint.model_state(a)}


def test_posthoc_files_are_not_models_and_bad_ones_are_named(tmp_path):
    info = profile("sigma_rel=0.05", 0.05, 16.97, 5)
    path = checkpoint.save_posthoc(tmp_path, [(info, checkpoint.model_state(Tied()))], 5, 0, {})
    with pytest.raises(CheckpointError, match="post-hoc EMA profiles .* give it the run's "
                                              "snapshots/"):
        checkpoint.read_checkpoint(path)
    snapshot = checkpoint.save_snapshot(tmp_path / "snaps", Tied(), 5, 0, {})
    with pytest.raises(CheckpointError, match="not a file of post-hoc EMA profiles"):
        checkpoint.read_posthoc(snapshot)
    cut = tmp_path / "cut" / "step_0000005.safetensors"
    cut.parent.mkdir()
    cut.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match="cut/step_0000005.safetensors is not a readable"):
        checkpoint.read_posthoc(cut)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.read_posthoc(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------------------------
# checksums, finite values, files written before them

def flip_a_byte_of(path, tensor):
    """Flip one bit inside `tensor`'s bytes where the file stores them."""
    blob = bytearray(path.read_bytes())
    at = blob.find(integrity.tensor_bytes(tensor).tobytes()[:64])
    assert at > 0
    blob[at + 5] ^= 0x10
    path.write_bytes(bytes(blob))


def test_every_format_carries_a_checksum_and_its_readers_verify_it(tmp_path):
    model = Tied()
    weight = checkpoint.model_state(model)["emb.weight"]
    resume = checkpoint.save_resume(tmp_path, payload(10, model), keep_last=0)
    snapshot = checkpoint.save_snapshot(tmp_path / "snapshots", model, 10, 0, {})
    profile_file = checkpoint.save_posthoc(tmp_path / "posthoc", [(profile(
        "sigma_rel=0.05", 0.05, 16.97, 9), checkpoint.model_state(model))], 10, 0, {})
    assert torch.load(resume, weights_only=True)["checksum"].startswith("xxh3_128:")
    for path in (snapshot, profile_file):
        assert safe_open(path, "pt").metadata()["checksum"].startswith("xxh3_128:")
    for path, read in ((resume, checkpoint.read_checkpoint), (snapshot, checkpoint.read_checkpoint),
                       (profile_file, checkpoint.read_posthoc)):
        read(path)
        flip_a_byte_of(path, weight)
        with pytest.raises(CheckpointError, match=f"{path.name} is corrupt: its contents do not "
                                                  f"match the checksum written with it"):
            read(path)
        read(path, tensors=False)   # a header alone is not verified: only what is used


def test_metadata_and_plain_values_are_covered_too(tmp_path):
    resume = checkpoint.save_resume(tmp_path, payload(10), keep_last=0)
    saved = torch.load(resume, weights_only=True)
    torch.save({**saved, "tokens_seen": 101}, resume)   # was 100
    with pytest.raises(CheckpointError, match="is corrupt"):
        checkpoint.read_checkpoint(resume)
    snapshot = checkpoint.save_snapshot(tmp_path / "s", Tied(), 10, 0, {})
    tensors, metadata = load_file(snapshot), safe_open(snapshot, "pt").metadata()
    save_file(tensors, snapshot, metadata={**metadata, "step": "11"})
    with pytest.raises(CheckpointError, match="is corrupt"):
        checkpoint.read_checkpoint(snapshot)


def test_files_without_a_checksum_still_load(tmp_path):
    """Files written before checksums (and nanoGPT's, tests/test_average.py) load as before."""
    model = Tied()
    resume = checkpoint.save_resume(tmp_path, payload(10, model), keep_last=0)
    saved = torch.load(resume, weights_only=True)
    del saved["checksum"]
    torch.save(saved, resume)
    snapshot = checkpoint.save_snapshot(tmp_path / "s", model, 10, 0, {})
    metadata = safe_open(snapshot, "pt").metadata()
    del metadata["checksum"]
    save_file(load_file(snapshot), snapshot, metadata=metadata)
    for path in (resume, snapshot):
        record = checkpoint.read_checkpoint(path)
        assert record.step == 10 and torch.equal(record.weights["emb.weight"],
                                                 checkpoint.model_state(model)["emb.weight"])


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_a_non_finite_tensor_is_named_on_reading(where, tmp_path):
    model = Tied()
    state = payload(10, model)
    if where == "model":
        state["model"]["norm.weight"] = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    else:
        state["optimizer"] = {"state": {0: {"exp_avg": torch.tensor([float("inf")])}}}
    path = checkpoint.save_resume(tmp_path, state, keep_last=0)
    name = "model/norm.weight" if where == "model" else "optimizer/state/0/exp_avg"
    with pytest.raises(CheckpointError, match=f"ckpt_0000010.pt: {name} holds NaN or infinite"):
        checkpoint.read_checkpoint(path)


def test_all_finite_is_exact_where_a_sum_overflows():
    big = torch.full((4,), 3e38)
    assert integrity.all_finite([big])
    assert not integrity.all_finite([big, torch.tensor([-math.inf])])
    assert integrity.first_non_finite([("a", big), ("b", torch.tensor([0.0, math.nan]))]) == "b"
