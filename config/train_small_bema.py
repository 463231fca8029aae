# BEMA (Block & Zhang, arXiv 2508.00180) on GPT-2 small (124M) / OpenWebText, on the high-LR
# trajectory of config/train_small_lawa.py so it compares directly with LAWA, EMA and SWA there.
# The paper's defaults (kappa = ema_power 0.5, eta = bias_power 0.2, rho = lag 10, gamma = 1, as
# in TRL's BEMACallback) come from fine-tuning, where theta_0 is a pretrained model; the authors'
# configs also floor beta at 1e-4 (bema_min_ema_multiplier, negligible here). Not a reproduction
# of a paper run: adapted to pretraining,
#   - burn-in tau = the 2000 warmup steps, so theta_0 (the anchor of the bias correction) is a
#     trained model, not the random init; t counts from there (TRL's callback keeps the
#     absolute step: with this burn-in its b = 10 + s is ours with lag 2010, docs/averaging.md);
#   - update every 400 steps, the authors' and TRL's period, with t counted in steps as theirs:
#     the period is part of the estimate, not a spacing of reads (docs/averaging.md; every step
#     the EMA forgets theta_0 at once and the correction only extrapolates, docs/results.md).
# The paper's "EMA" is this with --bema_bias_power=-1.
#   python -m data.openwebtext.prepare
#   torchrun --standalone --nproc_per_node=8 train.py config/train_small_bema.py
from pathlib import Path as _Path

exec((_Path(__file__).parent / "train_small_lawa.py").read_text())

out_dir = "out/small_bema"            # disk: about 39 GiB (train_small_lawa.py's snapshots)
averaging = "bema"
bema_ema_power = 0.5
bema_bias_power = 0.2
bema_lag = 10.0
bema_multiplier = 1.0
bema_min_ema_multiplier = 0.0
bema_update_after = 2000
bema_update_freq = 400
