"""
Evaluate any checkpoint: loss and perplexity on a fixed set of batches, and the geometry of its
token embeddings (embedding_metrics.py).

    python eval_ckpt.py --ckpt=out/shakespeare_char/ckpt_0002000.pt
    python eval_ckpt.py --ckpt=out/run/averaged/bema/step_0002000.safetensors --train_loss=True
    python eval_ckpt.py --ckpt=nanogpt/ckpt.pt --dataset=openwebtext --out_json=eval.json

Any checkpoint: a resume checkpoint (ckpt_*.pt), a snapshot (*.safetensors, also the averaged
ones of train.py --save_averaged and average.py --save), or a nanoGPT-style .pt
(checkpoint.load_model reads them all), on the data it records (this project's files, nanoGPT's
config) unless --dataset or --data_dir says otherwise; data of another vocabulary is refused.
The batches are dataloader.evaluate_loss's: with the same eval_iters, batch_size, block_size and
seed they are the batches train.py and average.py report, so the numbers compare one to one.
"""

import json
import math
from dataclasses import dataclass

from wagpt import checkpoint
from wagpt.atomic import atomic_write
from wagpt.configurator import main
from wagpt.dataloader import EvalBatches, evaluate_loss, open_checkpoint_data
from wagpt.embedding_metrics import count_tokens, embedding_metrics
from wagpt.errors import ConfigError
from wagpt.report import Progress, markdown_table
from wagpt.runtime import check_dtype, init_runtime, teardown


@dataclass
class EvalConfig:
    ckpt: str = ""                 # the weights: ckpt_*.pt, *.safetensors or a nanoGPT .pt
    dataset: str | None = None     # a prepared folder under data/ (None: the checkpoint's) ...
    data_dir: str | None = None    # ... or an explicit path
    eval_iters: int = 200          # batches per split (0: skip the losses, embeddings only)
    batch_size: int = 12
    block_size: int | None = None  # None: the model's context length (as average.py)
    seed: int = 1337               # picks the batches (train.py's default seed)
    train_loss: bool = False       # also the loss on train batches (train.py's eval_train stream)
    embeddings: bool = True        # embedding metrics (the frequency correlation counts train.bin)
    out_json: str | None = None    # also write the numbers here
    device: str = "auto"           # 'auto' (cuda if available) | 'cpu' | 'cuda' | 'cuda:1' ...
    dtype: str = "auto"            # 'auto' = bf16 autocast on CUDA, as train.py evaluates

    def __post_init__(self):
        if not self.ckpt:
            raise ValueError("ckpt is not set: --ckpt=out/<run>/ckpt_0002000.pt (or a "
                             "*.safetensors snapshot, or a nanoGPT .pt)")
        if self.eval_iters < 0:
            raise ValueError(f"eval_iters={self.eval_iters} must be >= 0 (0: no losses)")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size={self.batch_size} must be > 0")
        check_dtype(self.dtype)


def evaluate(cfg):
    """Load, evaluate, print a table (and write out_json); returns the numbers as a dict."""
    runtime = init_runtime(cfg.device, cfg.dtype)
    try:
        model, record = checkpoint.load_model(cfg.ckpt, runtime.device)
        data = open_checkpoint_data(record, cfg.dataset, cfg.data_dir)   # its own unless given
        args = record.model_args
        block_size = cfg.block_size or args["block_size"]
        if block_size > args["block_size"]:
            raise ConfigError(f"block_size={block_size} is longer than the model's context "
                              f"({args['block_size']})")
        data.check_fits(block_size, args["vocab_size"])
        info = {"path": str(record.path), "step": record.step,
                "tokens_seen": record.tokens_seen, "model_args": args}
        if record.averager is not None:
            info.update(averager=record.averager, hparams=record.hparams)
        results = {"ckpt": info, "data_dir": str(data.dir),
                   "eval": {"eval_iters": cfg.eval_iters, "batch_size": cfg.batch_size,
                            "block_size": block_size, "seed": cfg.seed}}
        if cfg.eval_iters:
            splits = ("train", "val") if cfg.train_loss else ("val",)
            batches = EvalBatches(cfg.eval_iters, cfg.batch_size, block_size, cfg.seed)
            meter = Progress(len(range(runtime.rank, cfg.eval_iters, runtime.world_size))
                             * len(splits), "eval batches")
            losses = evaluate_loss(model, data, batches, runtime, splits, progress=meter)
            meter.close()
            for split, loss in losses.items():
                results[f"{split}_loss"] = loss
                results[f"{split}_perplexity"] = math.exp(loss)
        if cfg.embeddings:
            results["embeddings"] = _embedding_results(model, data)
        if runtime.master:
            print(format_table(results))
            if cfg.out_json:
                atomic_write(cfg.out_json, json.dumps(results, indent=2) + "\n")
                print(f"wrote {cfg.out_json}")
        return results
    finally:
        teardown(runtime)


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
             ""]
    table = []
    for split in ("train", "val"):
        if f"{split}_loss" in results:
            table.append((f"{split} loss", f"{results[f'{split}_loss']:.4f}"))
            table.append((f"{split} perplexity", f"{results[f'{split}_perplexity']:.3f}"))
    m = results.get("embeddings")
    if m:
        table += [("isotropy I(E)", f"{m['isotropy']:.4g}"),
                  ("mean embedding norm", f"{m['mean_norm']:.4f}"),
                  ("norm of the mean embedding", f"{m['norm_of_mean']:.4f}"),
                  ("norm of mean / mean norm", f"{m['norm_ratio']:.4f}"),
                  ("sigma_min / sigma_max", f"{m['singular_value_ratio']:.4g}"),
                  ("corr(norm, log frequency)", _number(m["norm_logfreq_pearson"])),
                  ("isotropy, Coupled Adam code's convention",
                   f"{m['isotropy_solver_sign_all_rows']:.4g}"),
                  ("corr(norm, log probability), Coupled Adam code's convention",
                   _number(m.get("norm_logprob_pearson_all_rows")))]
    lines.append(markdown_table([{"metric": k, "value": v} for k, v in table],
                                [("metric", "metric"), ("value", "value")]))
    if m:
        notes = [f"over {m['rows']} token rows"]
        if m["padding_rows_excluded"]:
            notes.append(f"{m['padding_rows_excluded']} padding rows past the data's vocabulary "
                         f"left out")
        if m["unseen_tokens_excluded"]:
            notes.append(f"the correlation leaves out {m['unseen_tokens_excluded']} tokens that "
                         f"never occur in train.bin")
        notes.append("the Coupled Adam code's convention: every row of E, padding and unseen "
                     "tokens included, one solver-chosen sign per eigenvector "
                     "(embedding_metrics.py)")
        lines += ["", "embeddings: " + "; ".join(notes)]
    return "\n".join(lines)


def _number(value):
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    main(EvalConfig, evaluate, __doc__)
