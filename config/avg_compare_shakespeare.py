# The averaging-baselines experiment on CPU, step 2 of 2 (`bash compare.sh` runs both): every
# method over the snapshots of config/compare_shakespeare.py (one every 50 steps), a small sweep
# for each, all from one pass. Offline an averager acts once per snapshot, so EMA decays are per
# snapshot (0.9 per 50 steps ~ 0.998 per step); BEMA/DEMA/OUEMA schedules use the real step.
#   python average.py config/avg_compare_shakespeare.py
ckpt_dir = "out/compare_shakespeare/snapshots"
out_dir = "out/compare_shakespeare/averaging"
dataset = "shakespeare_char"
methods = "lawa,swa,ema,bema,dema,ouema,wa"
eval_iters = 50

lawa_k = [3, 5, 10]                 # the k latest snapshots (LAWA: 5)
swa_start = [0, 1000]               # uniform mean from the start / from the second half
ema_decay = [0.7, 0.9]              # per snapshot
bema_bias_power = [-1.0, 0.2, 0.4]  # -1: the paper's power-EMA baseline; 0.2 its default
bema_ema_power = [0.5]
dema_ema_power = [0.5]
ouema_bias_power = [0.2]
wa_horizon = [250, 500]             # windows of 5 or 10 snapshots
wa_windows = [1]
