# The default run: a small character-level GPT on the complete works of Shakespeare, on a CPU in a
# few minutes (nanoGPT's "baby" config: 4 layers, 4 heads, 128 wide, context 64).
#   python -m data.shakespeare_char.prepare && python train.py config/train_shakespeare_char.py
# These are also train.py's defaults; the file is the place to start your own variant.
# At every eval it prints the raw model's val loss next to EMA, BEMA and LAWA averages of it.

out_dir = "out/shakespeare_char"
dataset = "shakespeare_char"
eval_interval = 250
eval_iters = 100
log_interval = 10
ckpt_interval = 250

batch_size = 12
block_size = 64
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 1e-3
lr_schedule = "cosine"
max_iters = 2000
warmup_iters = 100
min_lr = 1e-4
beta2 = 0.99

# weight averaging during training (averaging.py has every method's keys and defaults)
averaging = "ema,bema,lawa"
ema_decay = 0.995        # EMA half-life ~140 steps
bema_ema_power = 0.5     # BEMA with the paper's defaults (every 400 steps, the library's
                         # bema_update_freq), from step 0: in pretraining from init its
                         # correction hurts (README, docs/results.md)
bema_bias_power = 0.2
bema_lag = 10.0
lawa_k = 5               # LAWA: the mean of the 5 latest checkpoints, 100 steps apart
lawa_interval = 100
