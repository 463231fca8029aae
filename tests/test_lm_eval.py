"""Downstream evaluation (README): an exported model and its GPT-2 tokenizer run through
lm-evaluation-harness' Python entry point on the local task in examples/lm_eval, offline, and
lm-eval's log-likelihoods are our model's own.

lm-eval and accelerate are optional extras (requirements-extra.txt); CI installs them, so this
test runs there. Without them it is skipped with the install command."""

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate", reason="pip install -r requirements-extra.txt")

import export_hf
from model import GPT, GPTConfig
from wagpt import checkpoint
from wagpt.corpora import offline_gpt2_encoding

lm_eval = pytest.importorskip("lm_eval", reason="pip install -r requirements-extra.txt")

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models

TASKS = Path(__file__).resolve().parent.parent / "examples" / "lm_eval"


@torch.no_grad()
def log_likelihood(model, context, continuation):
    """log p(continuation | context) under our GPT: the sum over the continuation's tokens."""
    ids = torch.tensor([context + continuation])
    logits, _ = model(ids[:, :-1], targets=ids[:, 1:])   # targets: logits at every position
    logprobs = torch.log_softmax(logits[0].double(), dim=-1)
    positions = range(len(context) - 1, ids.shape[1] - 1)
    return sum(logprobs[p, ids[0, p + 1]].item() for p in positions)


def test_lm_eval_scores_an_exported_model_on_the_local_task(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    encoding = offline_gpt2_encoding()          # the pinned GPT-2 ranks, never tiktoken's download
    monkeypatch.setattr("wagpt.corpora.gpt2_encoding", lambda *args: encoding)
    torch.manual_seed(0)
    args = dict(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                bias=True)
    model = GPT(GPTConfig(**args)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))   # far from uniform, so the choices differ
    snapshot = checkpoint.save_snapshot(tmp_path / "snap", model, 100, 6400, args)
    out = export_hf.export(export_hf.ExportConfig(ckpt=str(snapshot), out_dir=str(tmp_path / "hf")))

    # what `lm_eval --model hf --model_args pretrained=DIR --include_path examples/lm_eval
    # --tasks shakespeare_cloze` runs (the built-in tasks left out: indexing them takes ~20 s)
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(out), "dtype": "float32"},
        tasks=["shakespeare_cloze"], device="cpu", batch_size=8, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))

    docs = [json.loads(line) for line in (TASKS / "shakespeare_cloze.jsonl").read_text().splitlines()]
    samples = sorted(results["samples"]["shakespeare_cloze"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs) == 24
    correct = correct_norm = 0
    for doc, sample in zip(docs, samples):
        assert sample["target"] == doc["label"]
        ours = []
        for choice, (theirs, _greedy) in zip(doc["choices"], sample["filtered_resps"]):
            context = encoding.encode_ordinary(doc["context"])
            whole = encoding.encode_ordinary(doc["context"] + " " + choice)
            assert whole[:len(context)] == context           # the choice starts a new token
            ours.append(log_likelihood(model, context, whole[len(context):]))
            assert math.isclose(theirs, ours[-1], abs_tol=2e-4), (doc["context"], choice)
        correct += max(range(4), key=lambda i: ours[i]) == doc["label"]
        # acc_norm: log-likelihood per character of the choice, as lm-eval defines it
        correct_norm += max(range(4), key=lambda i: ours[i] / len(doc["choices"][i])) == doc["label"]
    scores = results["results"]["shakespeare_cloze"]
    assert scores["acc,none"] == correct / len(docs)
    assert scores["acc_norm,none"] == correct_norm / len(docs)
