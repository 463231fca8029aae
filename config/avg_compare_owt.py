# Offline averaging over the GPT-2 124M OpenWebText run of `bash compare.sh owt` (LAWA's high-LR
# recipe, config/train_small_lawa.py, a snapshot every 1000 steps, 71 in all). One update per
# snapshot (offline_time below): EMA decays are per snapshot; BEMA/DEMA/OUEMA schedules use the
# real step.
#   python average.py config/avg_compare_owt.py
ckpt_dir = "out/compare_owt/snapshots"
out_dir = "out/compare_owt/averaging"
dataset = "openwebtext"
methods = "all"                     # every registered method
offline_time = "snapshots"          # one update per snapshot (average.py's default: per step)
eval_iters = 200
batch_size = 8
eval_every = 5000

lawa_k = [3, 5, 10]
swa_start = [0, 35000]
ema_decay = [0.7, 0.9]
bema_bias_power = [-1.0, 0.2, 0.4]
bema_update_after = [2000]          # after the warmup, as config/train_small_bema.py
wa_horizon = [5000, 10000]
