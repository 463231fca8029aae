# SWA baseline of the LAWA paper on GPT-2 small (124M) / OpenWebText, same high-LR recipe as
# config/train_small_lawa.py: a uniform running mean of every 10th iterate from the start
# (the paper's code averages every 10 steps from step 0).
#   torchrun --standalone --nproc_per_node=8 train.py config/train_small_swa.py
from pathlib import Path as _Path

exec((_Path(__file__).parent / "train_small_lawa.py").read_text())

out_dir = "out/small_swa"
averaging = "swa"
swa_start = 0
swa_freq = 10
