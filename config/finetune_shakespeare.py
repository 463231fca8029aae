# Fine-tune pretrained GPT-2 (124M) on Shakespeare in GPT-2 BPE with BEMA: nanoGPT's
# config/finetune_shakespeare.py recipe (constant LR 3e-5, 1 x 32 sequences of 1024 tokens per
# step, an eval every 5 steps) run for 200 steps, in BEMA's own regime (Block & Zhang 2025,
# arXiv 2508.00180): θ₀ = the pretrained weights, the paper's fine-tuning hyperparameters.
#   python -m data.shakespeare.prepare
#   python train.py config/finetune_shakespeare.py                      # one GPU
#   python train.py config/finetune_shakespeare.py --init_from=./gpt2   # a local copy, no hub
# 'gpt2' comes from the Hugging Face hub through transformers (wagpt/hf_gpt2.py); where the hub is
# not reachable, `hf download openai-community/gpt2 config.json model.safetensors --local-dir gpt2`
# elsewhere and pass the folder. gpt2-medium / -large / -xl work the same (nanoGPT uses gpt2-xl).
out_dir = "out/finetune_shakespeare"
init_from = "gpt2"
dataset = "shakespeare"          # the complete works, 1.41M train / 0.16M val GPT-2 tokens

# nanoGPT's recipe; its train.py defaults made explicit where ours differ (beta2)
batch_size = 1
gradient_accumulation_steps = 32  # 32,768 tokens per step: 43 steps per epoch of train.bin
block_size = 1024
learning_rate = 3e-5
lr_schedule = "constant"          # nanoGPT: decay_lr = False
warmup_iters = 0
beta2 = 0.95
weight_decay = 0.1
dropout = 0.0
# nanoGPT runs 20 steps (2 epochs of its 0.3M-token tiny Shakespeare); 200 steps are 4.6 epochs
# of this larger corpus, long enough for the raw weights to start overfitting and the averages
# to be told apart
max_iters = 200
eval_interval = 5
eval_iters = 40
log_interval = 1
ckpt_interval = 200               # a 124M resume checkpoint with AdamW state is ~1.5 GB
keep_last = 1
compile = True

# BEMA at the paper's settings (its fine-tuning runs, hydra_configs/stabilizer/bema.yaml), from
# step 0 so that the bias correction is anchored at the pretrained model.
averaging = "bema,ema"
save_averaged = True              # out_dir/averaged/<method>/step_0000200.safetensors at the end,
                                  # to evaluate or export beside the raw weights
bema_ema_power = 0.5              # κ
bema_bias_power = 0.2             # η
bema_lag = 10.0                   # ρ
bema_multiplier = 1.0             # γ
bema_min_ema_multiplier = 0.0     # β_min (the paper's 1e-4 never binds here: β_t >= 210^-1/2)
bema_update_after = 0             # τ: θ₀ = the pretrained weights
# φ: the paper's code applies BEMA every φ = 400 steps with β_t and α_t counted in steps, so φ is
# part of the estimate (the EMA's hold on θ₀, which the correction removes; docs/averaging.md),
# not only a spacing of reads. At 400 this 200-step run would get one update; 10 is 5% of the
# run, as φ = 20 of the 400 steps where it was the best BEMA in docs/results.md (section 1;
# every step, the correction only extrapolates).
bema_update_freq = 10
# The paper's "EMA" baseline is BEMA without the correction (bema_bias_power = -1): β_t =
# (ρ + t)^-1/2. One run holds one BEMA setting, so the baseline here is `ema` with the same power
# schedule, 1 - d_t = (1 + t)^-1/2, i.e. lag 1 instead of 10 (within 5% of it after 100 steps).
# The exact baseline is a second run with --averaging=bema --bema_bias_power=-1: averaging never
# changes training, so both runs have bitwise the same raw weights.
ema_warmup = True
ema_warmup_power = 0.5
ema_warmup_gamma = 1.0
ema_decay = 0.9999                # the cap of the schedule, unreached in 200 steps
ema_update_after = 0
ema_update_freq = 10              # the same period as BEMA: the paper compares the two at one φ
