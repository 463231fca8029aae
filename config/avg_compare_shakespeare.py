# The averaging-baselines experiment on CPU, step 2 of 2 (`bash compare.sh` runs both): every
# method over the snapshots of config/compare_shakespeare.py (one every 50 steps), a small sweep
# for each, all from one pass. Here an averager acts once per snapshot (offline_time below, as
# docs/results.md measured it), so EMA decays are per snapshot (0.9 per 50 steps ~ 0.998 per
# step); BEMA/DEMA/OUEMA schedules use the real step.
#   python average.py config/avg_compare_shakespeare.py
ckpt_dir = "out/compare_shakespeare/snapshots"
out_dir = "out/compare_shakespeare/averaging"
dataset = "shakespeare_char"
methods = "all"                     # every registered method
offline_time = "snapshots"          # one update per snapshot (average.py's default: per step)
eval_iters = 50
eval_every = 100

lawa_k = [3, 5, 10]                 # the k latest snapshots (LAWA: 5)
swa_start = [0, 1000]               # uniform mean from the start / from the second half
ema_decay = [0.5, 0.7, 0.9]         # per snapshot
# BEMA, DEMA, OUEMA: their schedules b_t = lag + multiplier*t assume an update every step; with a
# snapshot every 50 steps, multiplier 0.02 counts t in snapshots instead. A burn-in of 1000 steps
# anchors BEMA's correction at a trained model rather than the random init.
bema_bias_power = [-1.0, 0.2]       # -1: the paper's power-EMA baseline; 0.2 its default
bema_multiplier = [1.0, 0.02]
bema_update_after = [0, 1000]
dema_multiplier = [1.0, 0.02]
ouema_multiplier = [1.0, 0.02]
wa_horizon = [250, 500]             # windows of 5 or 10 snapshots
phema_sigma_rel = [0.02, 0.05, 0.1, 0.2]  # power-function EMA widths, from the run's stored
                                    # post-hoc profiles (0.05, 0.10; every step)
