"""Downstream evaluation (README): README's recipe as written (lm-eval's command line) on a tiny
exported character-level model, and an exported model with its GPT-2 tokenizer through
lm-evaluation-harness' Python entry point; both on the local task in examples/lm_eval, offline,
with lm-eval's scores (and log-likelihoods) our model's own.

lm-eval and accelerate are optional extras (requirements-extra.txt); CI installs them, so this
test runs there. Without them it is skipped with the install command."""

import json
import math
import os
import re
import subprocess
import sys
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

    lines = (TASKS / "shakespeare_cloze.jsonl").read_text().splitlines()
    docs = [json.loads(line) for line in lines]
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
        best_norm = max(range(4), key=lambda i: ours[i] / len(doc["choices"][i]))
        correct_norm += best_norm == doc["label"]
    scores = results["results"]["shakespeare_cloze"]
    assert scores["acc,none"] == correct / len(docs)
    assert scores["acc_norm,none"] == correct_norm / len(docs)


def readme_cpu_recipe():
    """The commands of README's CPU recipe (the first bash block of "Downstream evaluation"),
    continuation lines joined and comments dropped."""
    text = (TASKS.parent.parent / "README.md").read_text()
    section = text[text.index("### Downstream evaluation"):]
    start = section.index("```bash\n") + len("```bash\n")
    block = section[start:section.index("```", start)].replace("\\\n", " ")
    return [line.split("  #")[0].split() for line in block.splitlines() if line.strip()]


def test_the_readme_recipe_runs_as_written_on_the_quickstart_model(tmp_path, tiny_data_dir):
    """README's commands as written (lm-eval's command line, offline), on a tiny character-level
    run in the place of the quickstart's: export_hf.py writes its tokenizer, lm-eval scores the
    local task, and its accuracy is our model's own on the 24 items."""
    import train
    from conftest import write_char_dataset
    from wagpt.trainer import TrainConfig

    docs = [json.loads(line) for line in
            (TASKS / "shakespeare_cloze.jsonl").read_text().splitlines()]
    text = "".join(d["context"] + " " + " ".join(d["choices"]) + "\n" for d in docs)
    data = write_char_dataset(tmp_path / "data", text * 30)   # every character of the task
    run = tmp_path / "out" / "shakespeare_char"
    train.train(TrainConfig(data_dir=str(data), out_dir=str(run), n_layer=1, n_head=2, n_embd=32,
                            block_size=96, batch_size=8, max_iters=40, warmup_iters=1,
                            learning_rate=1e-2, min_lr=1e-3, eval_interval=40, eval_iters=1,
                            device="cpu", averaging=""))   # trained: no near-ties below
    install, export, evaluate = readme_cpu_recipe()
    assert install[:2] == ["pip", "install"] and export[:2] == ["python", "export_hf.py"]
    assert evaluate[0] == "lm_eval"
    paths = {"out/shakespeare_char/ckpt_0002000.pt": str(run / "ckpt_0000040.pt"),
             "hf/shakespeare_char": str(tmp_path / "hf")}

    def as_here(args):
        for old, new in paths.items():
            args = [a.replace(old, new) for a in args]
        return args
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    repo = TASKS.parent.parent
    subprocess.run([sys.executable, *as_here(export)[1:]], cwd=repo, env=env, check=True,
                   capture_output=True, timeout=300)
    result = subprocess.run([sys.executable, "-m", "lm_eval", *as_here(evaluate)[1:]], cwd=repo,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    scores = dict(re.findall(r"\|(acc(?:_norm)?)\s*\|[^|]*\|([0-9.]+)\|", result.stdout))

    model, record = checkpoint.load_model(run / "ckpt_0000040.pt")
    chars = record.data["chars"]
    correct = correct_norm = 0
    for doc in docs:
        context = [chars.index(c) for c in doc["context"]]
        lls = [log_likelihood(model, context, [chars.index(c) for c in " " + choice])
               for choice in doc["choices"]]
        per_char = [ll / len(choice) for ll, choice in zip(lls, doc["choices"])]  # lm-eval's
        for values in (lls, per_char):   # a clear winner, so float32 rounding cannot decide
            top = sorted(values)
            assert top[-1] - top[-2] > 1e-3, doc
        correct += max(range(4), key=lambda i: lls[i]) == doc["label"]
        correct_norm += max(range(4), key=lambda i: per_char[i]) == doc["label"]
    assert float(scores["acc"]) == pytest.approx(correct / len(docs), abs=1e-4)
    assert float(scores["acc_norm"]) == pytest.approx(correct_norm / len(docs), abs=1e-4)
