# The AdamW baseline of the Coupled Adam comparison on GPT-2 small (124M) / OpenWebText: the
# Coupled Adam paper's 125M run of 50k steps with AdamW everywhere (its code, github.com/flxst/
# coupled-adam, config exp12A-node-125M-50k-baseline-s1.py). As in that code, the tied embedding is
# not weight-decayed (embdecay = False) here either, so that config/train_small_coupled_adam.py,
# which runs the same recipe with Coupled Adam on the embedding, differs from it in the optimizer
# alone. (train_small.py's AdamW does decay the embedding, like nanoGPT.)
# Hyperparameters from that code: see config/train_small_coupled_adam.py.
#   python -m data.openwebtext.prepare
#   torchrun --standalone --nproc_per_node=8 train.py config/train_small_adamw_baseline.py
from pathlib import Path as _Path

exec((_Path(__file__).parent / "train_small.py").read_text())

out_dir = "out/small_adamw_baseline"
optimizer = "adamw"
embedding_weight_decay = 0.0    # the paper's runs: no decay on the embedding, in both optimizers
gradient_accumulation_steps = 8  # 12 x 1024 x 8 = 98,304 tokens per step, as the paper's runs
max_iters = 50000
lr_decay_iters = 50000
warmup_iters = 100
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
eval_interval = 5000
ckpt_interval = 5000
snapshot_interval = 5000        # 11 snapshots with their profiles: disk: about 19 GiB
