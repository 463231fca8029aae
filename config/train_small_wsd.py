# GPT-2 small (124M) on OpenWebText with warmup-stable-decay (constant LR + a 1-sqrt cooldown over
# the last 20% of steps; Hägele et al. 2024): train_small.py's model, batch and peak LR with the
# schedule of the authors' wsd_schedule (epfml/schedules-and-scaling; cooldown from step
# max_iters - int(0.2 * max_iters), their decay_type "sqrt"), except its warmup, which starts at
# 1/100 of the peak where ours starts at 1/(warmup_iters + 1). The resume checkpoints of the
# constant phase are branch points for more cooldowns later, e.g. a 10%-long one from step 40000:
#   python train.py config/train_small_wsd.py --init_from=out/small_wsd/ckpt_0040000.pt \
#       --out_dir=out/small_wsd_cd40k --cooldown_start=40000 --max_iters=44000
# Launch:
#   torchrun --standalone --nproc_per_node=8 train.py config/train_small_wsd.py
from pathlib import Path as _Path

exec((_Path(__file__).parent / "train_small.py").read_text())

out_dir = "out/small_wsd"
lr_schedule = "wsd"
max_iters = 100000
warmup_iters = 2000
cooldown_frac = 0.2
cooldown_shape = "1-sqrt"
final_lr_frac = 0.0
ckpt_interval = 10000
keep_last = 0           # keep all 10 resume checkpoints (2.3 GiB each with AdamW state and the
                        # post-hoc profiles); 6 snapshots: disk: about 31 GiB
