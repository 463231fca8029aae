# The default run: a small character-level GPT on the complete works of Shakespeare, on a CPU in a
# few minutes (nanoGPT's "baby" config: 4 layers, 4 heads, 128 wide, context 64).
#   python data/shakespeare_char/prepare.py && python train.py config/train_shakespeare_char.py
# These are also train.py's defaults; the file is the place to start your own variant.

out_dir = "out/shakespeare_char"
dataset = "shakespeare_char"
eval_interval = 250
eval_iters = 100
log_interval = 50
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
