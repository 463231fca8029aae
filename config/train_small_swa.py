# The SWA baseline of the LAWA paper's code (github.com/sanyalsunny111/Early_Weight_Avg,
# nanoGPT2-Experiments/train_swa.py with swa_utils.SWA, update_every 10, update_after_step 0) on
# config/train_small_lawa.py's recipe: the uniform mean of every 10th iterate. Its update() runs
# after each optimizer step and acts on calls 0, 10, 20, ...; call 0 only copies, so its first
# averaged iterate is theta_11 (the weights after 11 updates): swa_start 11, swa_freq 10 here.
# Not the same: that script trains with 12 x 5 sequences per GPU, not train_small.py's 16 x 8;
# this config keeps the LAWA run's batch so that SWA, EMA and LAWA average one trajectory. (It
# also steps torch's SWALR scheduler, whose LR its own cosine overwrites every step.)
#   torchrun --standalone --nproc_per_node=8 train.py config/train_small_swa.py
from pathlib import Path as _Path

exec((_Path(__file__).parent / "train_small_lawa.py").read_text())

out_dir = "out/small_swa"             # disk: about 37 GiB (train_small_lawa.py's snapshots)
averaging = "swa"
swa_start = 11
swa_freq = 10
