"""eval_ckpt.py and embedding_metrics.py: the metrics against hand-computed values, and the
losses of any checkpoint equal to what train.py reported for the same weights and batches."""

import json
import math

import numpy as np
import pytest
import torch

import eval_ckpt
import train
from eval_ckpt import EvalConfig
from model import GPT, GPTConfig
from wagpt import checkpoint
from wagpt.configurator import load_config
from wagpt.dataloader import EvalBatches, evaluate_loss, open_dataset
from wagpt.embedding_metrics import (count_tokens, embedding_metrics, isotropy,
                                     norm_frequency_correlation, norm_stats, singular_value_ratio)
from wagpt.errors import CheckpointError, ConfigError
from wagpt.runtime import init_runtime
from wagpt.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models


# ---------------------------------------------------------------------------------------------
# embedding metrics


def test_isotropy_by_hand():
    # E^T E = diag(4, 1): c = +-x, +-y; Z(x) = e^2 + 1, Z(-x) = e^-2 + 1, Z(+-y) = 1 + e^+-1,
    # so I = (1 + e^-2) / (1 + e^2) = e^-2
    assert isotropy(torch.tensor([[2.0, 0.0], [0.0, 1.0]])) == pytest.approx(math.exp(-2))
    # rows symmetric around 0 along every eigenvector: Z is the same in every direction
    cross = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]])
    assert isotropy(cross) == pytest.approx(1.0)
    # norms of 1000 overflow exp() even in float64; the log-space sum does not
    assert isotropy(1000 * cross) == pytest.approx(1.0)


def test_isotropy_of_random_and_shifted_embeddings():
    E = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0))
    assert isotropy(E) > 0.8
    assert isotropy(0.02 * E) > 0.99              # GPT-2 init scale: nearly perfectly isotropic
    common = torch.zeros(8)
    common[3] = 10.0                              # every row moved along one direction:
    assert isotropy(E + common) < 1e-6            # Z(-c) / Z(c) ~ exp(-2 * 10) along it
    assert isotropy(E.numpy()) == pytest.approx(isotropy(E))   # arrays work as tensors do


def test_norms_and_singular_values_by_hand():
    E = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    stats = norm_stats(E)
    assert stats["mean_norm"] == pytest.approx((5 + 0 + 1) / 3)
    assert stats["norm_of_mean"] == pytest.approx(math.hypot(4 / 3, 4 / 3))
    assert stats["norm_ratio"] == pytest.approx(math.hypot(4 / 3, 4 / 3) / 2)
    s = np.linalg.svd(E, compute_uv=False)
    assert singular_value_ratio(E) == pytest.approx(s.min() / s.max())
    assert singular_value_ratio(np.diag([4.0, 0.5])) == pytest.approx(0.125)


def test_norm_frequency_correlation():
    counts = np.array([1, 10, 100, 1000, 0, 5])
    # norms exactly linear in log count (token 4 never occurs: left out, whatever its norm)
    norms = np.array([1.0, 2.0, 3.0, 4.0, 99.0, 1 + math.log10(5)])
    E = np.stack([norms, np.zeros(6)], axis=1)
    r, used, unseen = norm_frequency_correlation(E, counts)
    assert r == pytest.approx(1.0) and (used, unseen) == (5, 1)
    r, used, unseen = norm_frequency_correlation(E[:4], counts[:4][::-1])   # rarer = longer
    assert r == pytest.approx(-1.0) and (used, unseen) == (4, 0)
    assert norm_frequency_correlation(E, np.ones(6))[0] is None   # no spread in frequency
    with pytest.raises(ValueError, match="5 token counts for 6 embedding rows"):
        norm_frequency_correlation(E, counts[:5])


def test_embedding_metrics_leave_out_padding_rows():
    E = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    padded = torch.cat([E, 50 * torch.ones(3, 4)])   # 3 padding rows that would dominate
    counts = np.arange(1, 11)
    metrics = embedding_metrics(padded, counts, vocab_size=10)
    # the reference's conventions (*_all_rows) keep the padding rows by definition
    reference = {k: metrics.pop(k) for k in ("isotropy_solver_sign_all_rows",
                                              "norm_logprob_pearson_all_rows")}
    unpadded = embedding_metrics(E, counts)
    assert reference["isotropy_solver_sign_all_rows"] != unpadded["isotropy_solver_sign_all_rows"]
    assert metrics == {**{k: v for k, v in unpadded.items() if not k.endswith("_all_rows")},
                       "padding_rows_excluded": 3}
    full = embedding_metrics(padded, np.arange(1, 14))
    assert full["rows"] == 13 and full["isotropy"] < metrics["isotropy"]
    assert set(metrics) == {"rows", "padding_rows_excluded", "isotropy", "mean_norm",
                            "norm_of_mean", "norm_ratio", "singular_value_ratio",
                            "norm_logfreq_pearson", "norm_logfreq_tokens",
                            "unseen_tokens_excluded"}
    assert "norm_logfreq_pearson" not in embedding_metrics(E)
    with pytest.raises(ValueError, match="vocab_size=14"):
        embedding_metrics(padded, vocab_size=14)


def test_count_tokens_in_chunks():
    tokens = np.random.default_rng(0).integers(0, 7, size=1001).astype(np.uint16)
    counts = count_tokens(tokens, vocab_size=9, chunk=100)
    assert counts.tolist() == np.bincount(tokens, minlength=9).tolist()
    with pytest.raises(ValueError, match="id 6, outside a vocabulary of 5"):
        count_tokens(tokens, vocab_size=5)


# ---------------------------------------------------------------------------------------------
# eval_ckpt.py on real checkpoints

STEPS = 8


@pytest.fixture(scope="module")
def run_dir(tiny_data_dir, tmp_path_factory):
    """A tiny run with snapshots and an EMA saved beside them."""
    out = tmp_path_factory.mktemp("run")
    train.train(TrainConfig(
        data_dir=str(tiny_data_dir), out_dir=str(out), n_layer=2, n_head=2, n_embd=32,
        block_size=16, batch_size=4, max_iters=STEPS, eval_interval=STEPS, eval_iters=3,
        log_interval=4, ckpt_interval=STEPS, warmup_iters=2, learning_rate=1e-2, min_lr=1e-3,
        device="cpu", snapshot_interval=4, averaging="ema", ema_decay=0.8, save_averaged=True))
    return out


def eval_config(tiny_data_dir, ckpt, **overrides):
    # the batches train.py evaluated on: its eval_iters, batch_size, block_size and seed
    base = dict(ckpt=str(ckpt), data_dir=str(tiny_data_dir), eval_iters=3, batch_size=4,
                device="cpu")
    return EvalConfig(**{**base, **overrides})


def last_eval_record(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val_loss" in r][-1]


def test_losses_are_train_pys(run_dir, tiny_data_dir, tmp_path, capsys):
    """The last eval of train.py, recomputed from the resume checkpoint, the snapshot and the
    saved EMA: the same numbers, as they are the same weights on the same batches."""
    record = last_eval_record(run_dir)
    assert record["iter"] == STEPS
    out_json = tmp_path / "eval.json"
    results = eval_ckpt.evaluate(eval_config(tiny_data_dir, run_dir / f"ckpt_{STEPS:07d}.pt",
                                            train_loss=True, out_json=str(out_json)))
    assert results["val_loss"] == pytest.approx(record["val_loss"], abs=1e-6)
    assert results["train_loss"] == pytest.approx(record["train_loss"], abs=1e-6)
    assert results["val_perplexity"] == pytest.approx(math.exp(results["val_loss"]), rel=1e-12)
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(results))
    table = capsys.readouterr().out
    assert f"step {STEPS}" in table and f"| val loss | {results['val_loss']:.4f} |" in table
    assert "| isotropy I(E) |" in table

    snapshot = run_dir / "snapshots" / f"step_{STEPS:07d}.safetensors"
    from_snapshot = eval_ckpt.evaluate(eval_config(tiny_data_dir, snapshot))
    assert from_snapshot["val_loss"] == pytest.approx(record["val_loss"], abs=1e-6)
    assert from_snapshot["embeddings"] == results["embeddings"]

    averaged = run_dir / "averaged" / "ema" / f"step_{STEPS:07d}.safetensors"
    ema = eval_ckpt.evaluate(eval_config(tiny_data_dir, averaged))
    assert ema["ckpt"]["averager"] == "ema" and ema["ckpt"]["step"] == STEPS
    assert ema["val_loss"] == pytest.approx(record["val_loss/ema"], abs=1e-6)
    assert "(ema average)" in capsys.readouterr().out


def test_val_loss_equals_train_evaluate(run_dir, tiny_data_dir):
    """With other settings than the run's, still exactly evaluate_loss on the loaded model."""
    snapshot = run_dir / "snapshots" / "step_0000004.safetensors"
    record = checkpoint.read_checkpoint(snapshot)
    model = GPT(GPTConfig(**record.model_args))
    checkpoint.load_model_state(model, record.weights, snapshot)
    batches = EvalBatches(eval_iters=5, block_size=8, batch_size=3, seed=7)
    runtime = init_runtime("cpu", "float32")
    data = open_dataset("", data_dir=str(tiny_data_dir))
    expected = evaluate_loss(model, data, batches, runtime, splits=("val",))["val"]
    results = eval_ckpt.evaluate(eval_config(tiny_data_dir, snapshot, eval_iters=5, block_size=8,
                                            batch_size=3, seed=7, embeddings=False))
    assert results["val_loss"] == expected
    assert results["val_perplexity"] == math.exp(expected)
    assert "embeddings" not in results and "train_loss" not in results


def test_nanogpt_checkpoint(run_dir, tiny_data_dir, tmp_path):
    """A nanoGPT-style .pt (compile prefixes, causal-mask buffers) evaluates like the snapshot."""
    snapshot = run_dir / "snapshots" / f"step_{STEPS:07d}.safetensors"
    record = checkpoint.read_checkpoint(snapshot)
    state, info = record.weights, {"model_args": record.model_args}
    model = {f"_orig_mod.{k}": v for k, v in state.items()}
    model["_orig_mod.transformer.h.0.attn.bias"] = torch.ones(1, 1, 16, 16).tril()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model, "model_args": info["model_args"], "iter_num": STEPS,
                "optimizer": {}}, path)
    nano = eval_ckpt.evaluate(eval_config(tiny_data_dir, path, embeddings=False))
    ours = eval_ckpt.evaluate(eval_config(tiny_data_dir, snapshot, embeddings=False))
    assert nano["val_loss"] == ours["val_loss"] and nano["ckpt"]["step"] == STEPS


def test_embedding_metrics_of_a_checkpoint(run_dir, tiny_data_dir):
    """The metrics of eval_ckpt.py are embedding_metrics of wte over the data's frequencies."""
    path = run_dir / "snapshots" / f"step_{STEPS:07d}.safetensors"
    model, _ = checkpoint.load_model(path)
    data = open_dataset("", data_dir=str(tiny_data_dir))
    counts = np.bincount(np.asarray(data.splits["train"]), minlength=data.vocab_size)
    expected = embedding_metrics(model.transformer.wte.weight, counts)
    results = eval_ckpt.evaluate(eval_config(tiny_data_dir, path, eval_iters=0))
    assert results["embeddings"] == expected and "val_loss" not in results
    assert 0 < expected["isotropy"] <= 1 and -1 <= expected["norm_logfreq_pearson"] <= 1


def test_bad_files_name_the_file(run_dir, tiny_data_dir, tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=f"{missing} does not exist"):
        checkpoint.load_model(missing)
    snapshot = (run_dir / "snapshots" / f"step_{STEPS:07d}.safetensors").read_bytes()
    truncated = tmp_path / "step_8.safetensors"
    truncated.write_bytes(snapshot[:len(snapshot) // 2])
    with pytest.raises(CheckpointError, match="step_8.safetensors"):
        eval_ckpt.evaluate(eval_config(tiny_data_dir, truncated))
    garbage = tmp_path / "ckpt_8.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="ckpt_8.pt"):
        checkpoint.load_model(garbage)
    with pytest.raises(ConfigError, match="ckpt is not set"):
        load_config(EvalConfig, [f"--data_dir={tiny_data_dir}"])
    with pytest.raises(ConfigError, match="did you mean 'eval_iters'"):
        load_config(EvalConfig, ["--ckpt=x.pt", "--eval_iter=3"])
