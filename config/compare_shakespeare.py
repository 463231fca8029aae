# The averaging-baselines experiment on CPU, step 1 of 2 (`bash compare.sh` runs both): train the
# default Shakespeare model at LAWA's high-LR setting (10x the default peak LR, cosine to 1/10)
# and keep a snapshot every 50 steps. Step 2, config/avg_compare_shakespeare.py, runs every
# averaging method over those snapshots offline. docs/results.md shows the outcome.
#   python train.py config/compare_shakespeare.py
from pathlib import Path as _Path

exec((_Path(__file__).parent / "train_shakespeare_char.py").read_text())

out_dir = "out/compare_shakespeare"
learning_rate = 1e-2
min_lr = 1e-3
lr_schedule = "cosine"
max_iters = 2000
warmup_iters = 100
snapshot_interval = 50
averaging = ""        # the averages are computed offline, all of them from the same snapshots
