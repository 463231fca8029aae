# BEMA's regime (Block & Zhang 2025, "EMA Without the Lag", arXiv 2508.00180) on a CPU: fine-tune
# a pretrained model with small, noisy batches and average from the pretrained weights θ₀. The
# model is the default character-level GPT pretrained on Shakespeare's 37 plays (2000 steps of
# config/train_shakespeare_char.py on data/shakespeare_char_plays); it is fine-tuned here on his 5
# poems (data/shakespeare_char_poems: verse without speaker names, same 84-symbol vocabulary),
# 4 sequences of 64 characters per step at a constant LR, for 400 steps (0.55 epochs of the
# poems), with BEMA, DEMA and OUEMA anchored at θ₀ and evaluated every 10 steps.
# experiments/bema_finetune.py runs all of it (pretraining, then seeds x this config and its EMA
# twin); by hand:
#   python -m data.shakespeare_char_plays.prepare && python -m data.shakespeare_char_poems.prepare
#   python train.py config/train_shakespeare_char.py --dataset=shakespeare_char_plays \
#       --averaging= --snapshot_interval=2000 --out_dir=out/experiments/bema_finetune/pretrain
#   python train.py config/finetune_shakespeare_char.py
#   python train.py config/finetune_shakespeare_char.py --averaging=bema --bema_bias_power=-1 \
#       --out_dir=out/finetune_shakespeare_char_ema     # the paper's EMA: same raw weights
from pathlib import Path as _Path

exec((_Path(__file__).parent / "train_shakespeare_char.py").read_text())

out_dir = "out/finetune_shakespeare_char"
dataset = "shakespeare_char_poems"
# θ₀: the pretrained weights without their AdamW state (a snapshot), so the fine-tuning starts
# with fresh moments as from a released model. A branch keeps the step count: steps 2000..2400.
init_from = "out/experiments/bema_finetune/pretrain/snapshots/step_0002000.safetensors"
max_iters = 2400
batch_size = 4                   # 256 characters per step: small, noisy batches
learning_rate = 3e-4             # 3x the pretraining's final LR; constant, as the paper's runs
lr_schedule = "constant"
warmup_iters = 0                 # (a warmup would not apply anyway: it counts from step 0)
eval_interval = 10
eval_iters = 100                 # 100 x 4 x 64 = 25.6k characters of the 20.7k-character val split
log_interval = 10
ckpt_interval = 2400

# The paper's settings (its hydra_configs/stabilizer/bema.yaml), anchored at the branch step.
averaging = "bema,dema,ouema"
bema_ema_power = 0.5             # κ
bema_bias_power = 0.2            # η
bema_lag = 10.0                  # ρ
bema_multiplier = 1.0            # γ
bema_min_ema_multiplier = 0.0    # β_min (the paper's 1e-4 never binds: β_t >= 410^-1/2 here)
bema_update_after = 2000         # τ: θ₀ = e = the pretrained weights
# φ: BEMA acts every φ steps with β_t and α_t counted in steps (the authors' code, TRL), so φ is
# part of the estimate: the longer it is, the longer the EMA holds θ₀ and the more the correction
# has to remove (docs/averaging.md). The authors' 400 would be one update in this run; in
# docs/results.md (section 1) φ = 20 is the best BEMA of φ = 1..100 for these 400 steps (every
# step, the correction only extrapolates: 0.032 behind its EMA twin).
bema_update_freq = 20
dema_update_after = 2000         # DEMA and OUEMA at their defaults (docs/averaging.md), same τ
ouema_update_after = 2000
