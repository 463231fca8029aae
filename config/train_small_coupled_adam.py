# Coupled Adam (Stollenwerk & Stollenwerk, ACL 2025, arXiv:2502.08441) on GPT-2 small (124M) /
# OpenWebText: the paper's small-scale 125M run of 50k steps (its code, github.com/flxst/coupled-
# adam, config exp12V-node-125M-50k-AVG-s1.py). Its AdamW baseline is
# config/train_small_adamw_baseline.py (exp12A): the two differ only in the embedding's optimizer.
# From that code: ~98k tokens per step (12 sequences x 1024 tokens x 8 micro-batches, over all
# GPUs), peak LR 6e-4 with 100 warmup steps, cosine to 6e-5 at step 50000, weight decay 0.1 on the
# matrices but none on the tied embedding (its embdecay = False, in both runs), betas (0.9, 0.95),
# gradient clipping 1.0, coupled scale 1 (its scaled variants use powers of 2).
# Not the same: its warmup is lr*s/100 (0 at step 0), ours lr*(s+1)/101; batches and init differ.
# Compare val loss and embedding isotropy (eval_ckpt.py) with out/small_adamw_baseline.
#   python -m data.openwebtext.prepare
#   torchrun --standalone --nproc_per_node=8 train.py config/train_small_coupled_adam.py
from pathlib import Path as _Path

exec((_Path(__file__).parent / "train_small_adamw_baseline.py").read_text())

out_dir = "out/small_coupled_adam"   # disk: about 19 GiB (the baseline's snapshots)
optimizer = "coupled_adam"
coupled_adam_scale = 1.0
