# GPT-2 small (124M) on OpenWebText, AdamW + cosine: nanoGPT's GPT-2 reproduction recipe
# (config/train_gpt2.py there: 600k steps, peak LR 6e-4 to 6e-5, 2000 warmup steps). The other
# train_small_* configs start from it. Global batch ~0.5M tokens: 12 sequences x 1024 tokens x 40
# micro-steps (5 per GPU on 8 GPUs).
#   python -m data.openwebtext.prepare
#   torchrun --standalone --nproc_per_node=8 train.py config/train_small.py

out_dir = "out/small"
dataset = "openwebtext"
eval_interval = 1000
eval_iters = 200
log_interval = 10
ckpt_interval = 1000
# A snapshot is 0.46 GiB and the post-hoc profiles (on with the snapshots) add 0.93 GiB to each;
# a resume checkpoint with AdamW state and the profiles is 2.3 GiB. Every 20000 steps keeps 31
# snapshots over the run: disk: about 47 GiB (train.py prints the plan at start and refuses one
# that does not fit). A snapshot every 1000 steps would write 839 GiB.
snapshot_interval = 20000

model_size = "gpt2"
vocab_size = 50304      # 50257 padded to a multiple of 64 for faster matmuls
block_size = 1024
batch_size = 12
gradient_accumulation_steps = 40
dropout = 0.0
bias = False

learning_rate = 6e-4
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
lr_schedule = "cosine"
max_iters = 600000
warmup_iters = 2000
min_lr = 6e-5

compile = True
averaging = ""          # none; the _lawa/_ema/_swa/_bema configs average on LAWA's recipe
