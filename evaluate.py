"""
Evaluate any checkpoint: loss and perplexity on a fixed set of batches, and the geometry of its
token embeddings (embedding_metrics.py).

    python evaluate.py --ckpt=out/shakespeare_char/ckpt_0002000.pt
    python evaluate.py --ckpt=out/run/averaged/bema/step_0002000.safetensors --train_loss=True
    python evaluate.py --ckpt=nanogpt/ckpt.pt --dataset=openwebtext --out_json=eval.json

Any checkpoint: a resume checkpoint (ckpt_*.pt), a snapshot (*.safetensors, also the averaged
ones of train.py --save_averaged and average.py --save), or a nanoGPT-style .pt. The batches are
train.evaluate's: with the same eval_iters, batch_size, block_size and seed they are the batches
train.py and average.py report, so the numbers compare one to one.

load_model() is the one loader of a model from a file; sample.py and export_hf.py use it too.
"""

import json
import math
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

import checkpoint
import train
import trajectory
from checkpoint import CheckpointError
from configurator import load_config
from embedding_metrics import count_tokens, embedding_metrics
from model import GPT, GPTConfig


@dataclass
class EvalConfig:
    ckpt: str = ""                 # the weights: ckpt_*.pt, *.safetensors or a nanoGPT .pt
    dataset: str = "shakespeare_char"  # a prepared folder under data/ ...
    data_dir: str | None = None    # ... or an explicit path
    eval_iters: int = 200          # batches per split (0: skip the losses, embeddings only)
    batch_size: int = 12
    block_size: int | None = None  # None: the model's context length (as average.py)
    seed: int = 1337               # picks the batches (train.py's default seed)
    train_loss: bool = False       # also the loss on train batches (train.py's eval_train stream)
    embeddings: bool = True        # embedding metrics (the frequency correlation counts train.bin)
    out_json: str | None = None    # also write the numbers here
    device: str = "auto"
    dtype: str = "auto"            # 'auto' = bf16 autocast on CUDA, as train.py evaluates

    def __post_init__(self):
        if not self.ckpt:
            raise ValueError("ckpt is not set: --ckpt=out/<run>/ckpt_0002000.pt (or a "
                             "*.safetensors snapshot, or a nanoGPT .pt)")
        if self.eval_iters < 0:
            raise ValueError(f"eval_iters={self.eval_iters} must be >= 0 (0: no losses)")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size={self.batch_size} must be > 0")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}: use 'auto', 'float32' or 'bfloat16'")


def load_model(path, device="cpu"):
    """(GPT in eval mode on `device`, info) from any checkpoint file.

    info: path, step (None if unknown), tokens_seen (None if unknown), model_args, and for an
    averaged snapshot its averager name and hyperparameters. Raises CheckpointError naming the
    file when it is missing, corrupt, unsafe to unpickle or of another architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    weights = trajectory.read(path)   # weights_only: a pickle that would run code is refused
    try:
        step = trajectory.read_step(path)
    except CheckpointError:
        step = None                   # no recorded step and no number in the name: fine here
    info = {"path": str(path), "step": step, "tokens_seen": weights.tokens_seen,
            "model_args": weights.model_args, **_averager_metadata(path)}
    try:
        model = GPT(GPTConfig(**weights.model_args))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: model_args {weights.model_args} do not build a GPT: "
                              f"{e}") from e
    checkpoint.load_model_state(model, weights.state, path)
    return model.to(device).eval(), info


def _averager_metadata(path):
    # train.py --save_averaged and average.py --save add `averager` and `hparams` (JSON strings)
    if path.suffix != ".safetensors":
        return {}
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    return {k: json.loads(metadata[k]) for k in ("averager", "hparams") if k in metadata}


def evaluate(cfg):
    """Load, evaluate, print a table (and write out_json); returns the numbers as a dict."""
    runtime = train.init_runtime(cfg)
    try:
        model, info = load_model(cfg.ckpt, runtime.device)
        data = train.open_dataset(cfg)
        args = info["model_args"]
        block_size = cfg.block_size or args["block_size"]
        if block_size > args["block_size"]:
            raise ValueError(f"block_size={block_size} is longer than the model's context "
                             f"({args['block_size']})")
        data.check_fits(block_size, args["vocab_size"])
        results = {"ckpt": info, "data_dir": str(data.dir),
                   "eval": {"eval_iters": cfg.eval_iters, "batch_size": cfg.batch_size,
                            "block_size": block_size, "seed": cfg.seed}}
        if cfg.eval_iters:
            splits = ("train", "val") if cfg.train_loss else ("val",)
            # train.evaluate reads only these four keys, so the batches are train.py's
            eval_cfg = types.SimpleNamespace(eval_iters=cfg.eval_iters, block_size=block_size,
                                             batch_size=cfg.batch_size, seed=cfg.seed)
            for split, loss in train.evaluate(model, data, eval_cfg, runtime, splits).items():
                results[f"{split}_loss"] = loss
                results[f"{split}_perplexity"] = math.exp(loss)
        if cfg.embeddings:
            results["embeddings"] = _embedding_results(model, data)
        if runtime.master:
            print(format_table(results))
            if cfg.out_json:
                text = json.dumps(results, indent=2) + "\n"
                checkpoint.atomic_write(cfg.out_json, lambda f: f.write(text.encode()))
                print(f"wrote {cfg.out_json}")
        return results
    finally:
        train.teardown(runtime)


def _embedding_results(model, data):
    # rows past the data's vocabulary are padding (50257 -> 50304): no token, left out
    counts = count_tokens(data.splits["train"], data.vocab_size)
    return embedding_metrics(model.transformer.wte.weight, counts, vocab_size=data.vocab_size)


def format_table(results):
    info = results["ckpt"]
    source = info["path"]
    if "averager" in info:
        source += f" ({info['averager']} average)"
    step = "?" if info["step"] is None else info["step"]
    tokens = "?" if info["tokens_seen"] is None else f"{info['tokens_seen']:,}"
    e = results["eval"]
    lines = [f"{source}: step {step}, {tokens} tokens seen",
             f"data {results['data_dir']}: {e['eval_iters']} batches of {e['batch_size']} x "
             f"{e['block_size']} tokens per split, seed {e['seed']}",
             "", "| metric | value |", "|---|---|"]
    for split in ("train", "val"):
        if f"{split}_loss" in results:
            lines.append(f"| {split} loss | {results[f'{split}_loss']:.4f} |")
            lines.append(f"| {split} perplexity | {results[f'{split}_perplexity']:.3f} |")
    m = results.get("embeddings")
    if m:
        lines += [f"| isotropy I(E) | {m['isotropy']:.4g} |",
                  f"| mean embedding norm | {m['mean_norm']:.4f} |",
                  f"| norm of the mean embedding | {m['norm_of_mean']:.4f} |",
                  f"| norm of mean / mean norm | {m['norm_ratio']:.4f} |",
                  f"| sigma_min / sigma_max | {m['singular_value_ratio']:.4g} |",
                  f"| corr(norm, log frequency) | {_number(m['norm_logfreq_pearson'])} |",
                  f"| isotropy, Coupled Adam code's convention | "
                  f"{m['isotropy_solver_sign_all_rows']:.4g} |",
                  f"| corr(norm, log probability), Coupled Adam code's convention | "
                  f"{_number(m.get('norm_logprob_pearson_all_rows'))} |"]
        notes = [f"over {m['rows']} token rows"]
        if m["padding_rows_excluded"]:
            notes.append(f"{m['padding_rows_excluded']} padding rows past the data's vocabulary "
                         f"left out")
        if m["unseen_tokens_excluded"]:
            notes.append(f"the correlation leaves out {m['unseen_tokens_excluded']} tokens that "
                         f"never occur in train.bin")
        notes.append("the Coupled Adam code's convention: every row of E, padding and unseen "
                     "tokens included, one solver-chosen sign per eigenvector (embedding_metrics.py)")
        lines += ["", "embeddings: " + "; ".join(notes)]
    return "\n".join(lines)


def _number(value):
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    evaluate(load_config(EvalConfig, sys.argv[1:]))
