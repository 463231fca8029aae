# LAWA (Sanyal et al., COLM 2024) on GPT-2 small (124M) / OpenWebText, with the high-LR recipe of
# the paper's code (github.com/sanyalsunny111/Early_Weight_Avg, nanoGPT2-Experiments/
# train_small.py): peak LR 6e-3 (10x nanoGPT's), 2000 warmup steps, cosine to 6e-4 at step 70000,
# weight decay 0.1, betas (0.9, 0.95), clipping 1.0, 16 sequences x 8 micro-steps per GPU on the
# 3 GPUs its README launches: 384 x 1024 = 393k tokens per step.
# Not the same: its warmup is lr*s/2000 (ours lr*(s+1)/2001); its model scales attention by the
# inverse layer index (scale_attn_by_inverse_layer_idx), which ours does not.
# LAWA: the mean of the k = 5 latest checkpoints, lawa_interval steps apart. Its lawa.py averages
# consecutive chunks of 5 checkpoint files, which is this sliding window read at each chunk's last
# checkpoint (docs/averaging.md). The spacing is whatever checkpoints sit in the folder lawa.py
# reads (its training scripts write one every 200 steps); the paper finds larger spacing better,
# and 1000 here is our choice.
# EMA and SWA baselines as in its code: config/train_small_ema.py / _swa.py, or add averagers to
# this run (averaging never changes training): --averaging=lawa,ema,swa,bema
#   python -m data.openwebtext.prepare
#   torchrun --standalone --nproc_per_node=8 train.py config/train_small_lawa.py
from pathlib import Path as _Path

exec((_Path(__file__).parent / "train_small.py").read_text())

out_dir = "out/small_lawa"
batch_size = 16
gradient_accumulation_steps = 24   # global: 8 per GPU on 3 GPUs, as the paper's code; 3 on 8
learning_rate = 6e-3
min_lr = 6e-4
max_iters = 70000
lr_decay_iters = 70000
warmup_iters = 2000
eval_interval = 1000
ckpt_interval = 1000
snapshot_interval = 1000   # the same trajectory for offline LAWA/SWA/EMA/BEMA (average.py)
# 71 snapshots of 0.46 GiB, without the post-hoc profiles (0.93 GiB more with every snapshot, 65
# GiB in all); with LAWA's state in the resume checkpoints: disk: about 40 GiB
# (_ema, _swa and _bema inherit the snapshots: about 37, 37 and 39 GiB)
posthoc_sigma_rel = None

averaging = "lawa"
lawa_k = 5
lawa_interval = 1000
lawa_start = 0
