# EMA baseline of the LAWA paper on GPT-2 small (124M) / OpenWebText, same high-LR recipe as
# config/train_small_lawa.py: EMA with decay 0.999 and timm's warmup d_t = min(d, 1-(1+t)^(-2/3)).
#   torchrun --standalone --nproc_per_node=8 train.py config/train_small_ema.py
from pathlib import Path as _Path

exec((_Path(__file__).parent / "train_small_lawa.py").read_text())

out_dir = "out/small_ema"
averaging = "ema"
ema_decay = 0.999
ema_warmup = True
ema_warmup_power = 2 / 3
ema_warmup_gamma = 1.0
ema_update_after = 0
ema_update_freq = 1
