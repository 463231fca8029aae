# The EMA baseline of the LAWA paper's code (github.com/sanyalsunny111/Early_Weight_Avg,
# nanoGPT2-Experiments/train_small.py, class EMA) on config/train_small_lawa.py's recipe: an
# EMA of every step with decay 0.9 and the warmup d_t = min(0.9, 1 - (1 + t)^(-2/3)).
# Its EMA class has no exact counterpart here: it copies theta_1 and theta_2 and applies this
# decay from step 3 on; ours from step 1 (ema_update_after = 1) applies the same decays from
# step 3 on but keeps 37% of theta_1 at step 2. The difference shrinks by 0.9 or more per step
# and is below float32 rounding by step ~80 (docs/averaging.md, tests/test_parity.py).
#   torchrun --standalone --nproc_per_node=8 train.py config/train_small_ema.py
from pathlib import Path as _Path

exec((_Path(__file__).parent / "train_small_lawa.py").read_text())

out_dir = "out/small_ema"             # disk: about 37 GiB (train_small_lawa.py's snapshots)
averaging = "ema"
ema_decay = 0.9
ema_warmup = True
ema_warmup_power = 2 / 3
ema_warmup_gamma = 1.0
ema_update_after = 1
ema_update_freq = 1
