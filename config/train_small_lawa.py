# LAWA (Sanyal et al., COLM 2024) on GPT-2 small (124M) / OpenWebText: the paper's high-LR recipe
# (peak LR 6e-3, 10x nanoGPT's, cosine to 6e-4 over 70k steps, 2k warmup), averaging the k = 5
# latest checkpoints spaced lawa_interval steps apart (larger spacing helps, per the paper).
# EMA and SWA baselines on the same trajectory: config/train_small_ema.py / _swa.py, or add them
# to this run (averaging never changes training): --averaging=lawa,ema,swa,bema
#   python data/openwebtext/prepare.py
#   torchrun --standalone --nproc_per_node=8 train.py config/train_small_lawa.py
from pathlib import Path as _Path

exec((_Path(__file__).parent / "train_small.py").read_text())

out_dir = "out/small_lawa"
learning_rate = 6e-3
min_lr = 6e-4
max_iters = 70000
lr_decay_iters = 70000
warmup_iters = 2000
eval_interval = 1000
ckpt_interval = 1000
snapshot_interval = 1000   # the same trajectory for offline LAWA/SWA/EMA/BEMA (average.py)

averaging = "lawa"
lawa_k = 5
lawa_interval = 1000
lawa_start = 0
