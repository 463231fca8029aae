#!/usr/bin/env bash
# Every entry point once on a CUDA GPU, on the small char model: CI has no GPU, so this is how a
# session with one checks the CUDA paths (Triton kernels inside training, bf16 autocast, NCCL,
# resume, offline averaging, evaluation, sampling, export). Needs data/shakespeare_char prepared.
#   bash .ci/gpu_smoke.sh            # ~3 minutes on one H100; stops at the first failure
#   DEVICE=cpu bash .ci/gpu_smoke.sh # the same commands on a CPU (no compile), to check the script
set -euo pipefail
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEV=${DEVICE:-cuda}
COMPILE=$([ "$DEV" = cpu ] && echo False || echo True)
W=${SMOKE_DIR:-out/gpu_smoke}
rm -rf "$W"
ALL="--averaging=all --lawa_interval=20 --wa_horizon=20 --swa_start=20"
RUN="--device=$DEV --warmup_iters=10 --max_iters=80 --eval_interval=20 --eval_iters=5 --ckpt_interval=20 --snapshot_interval=20"
step() { echo; echo "=== $*"; }

step "train to step 60 of 80, every averager, compile, averaged weights saved"
$PY train.py $RUN $ALL --stop_iter=60 --compile=$COMPILE --save_averaged=True --out_dir=$W/run
step "resume to step 80"
$PY train.py $RUN $ALL --compile=$COMPILE --save_averaged=True --out_dir=$W/run --init_from=resume
step "torchrun, 1 process (NCCL, sharded averagers)"
$PY -m torch.distributed.run --standalone --nproc_per_node=1 train.py $RUN $ALL --stop_iter=40 --out_dir=$W/ddp
step "Coupled Adam"
$PY train.py $RUN --optimizer=coupled_adam --averaging= --stop_iter=40 --out_dir=$W/coupled
step "offline averaging over the snapshots, on the GPU, saving the best"
$PY average.py --ckpt_dir=$W/run/snapshots --out_dir=$W/avg --device=$DEV --eval_iters=5 \
    --lawa_interval=20 --wa_horizon=20 --save=best
step "offline: phema from the stored post-hoc profiles, the state on the GPU, then in pinned host memory: the same results.csv"
for SD in device host; do
  $PY average.py --ckpt_dir=$W/run/snapshots --out_dir=$W/avg_$SD --device=$DEV --eval_iters=5 \
      --methods=phema,ema,lawa --phema_sigma_rel=[0.02,0.05,0.1,0.2] --lawa_interval=20 \
      --state_device=$SD --state_chunk=100000 --plot=False
done
cmp $W/avg_device/results.csv $W/avg_host/results.csv
step "offline under torchrun (1 process)"
$PY -m torch.distributed.run --standalone --nproc_per_node=1 average.py --ckpt_dir=$W/run/snapshots \
    --out_dir=$W/avg_ddp --device=$DEV --eval_iters=5 --methods=phema,ema
step "evaluate (resume checkpoint, averaged snapshot), with embedding metrics"
$PY eval_ckpt.py --ckpt=$W/run/ckpt_0000080.pt --device=$DEV --eval_iters=5
$PY eval_ckpt.py --ckpt=$(ls $W/run/averaged/bema/*.safetensors | tail -1) --device=$DEV \
    --eval_iters=5
step "sample"
$PY sample.py --ckpt=$W/run/ckpt_0000080.pt --device=$DEV --prompt="ROMEO:" --max_new_tokens=40
step "export to Hugging Face (export_hf.py checks the logits against ours)"
$PY export_hf.py --ckpt=$W/run/ckpt_0000080.pt --out_dir=$W/hf
echo; echo "gpu smoke: all steps passed"
