#!/usr/bin/env bash
# The GPU checks and benchmarks of docs/benchmarks.md, for a machine with one CUDA GPU, in as
# few minutes as they can take. Each stage's output goes to $OUT/gpu_check.log, each benchmark's
# JSON line to $OUT/bench.jsonl; a stage that fails is reported and the next one runs.
#   bash .ci/gpu_check.sh                          # every stage (~9 minutes on one H200)
#   bash .ci/gpu_check.sh smoke kernels sweep      # some of them
# Stages:
#   smoke      .ci/gpu_smoke.sh: every command on CUDA (compile, bf16, NCCL, resume, offline)
#   kernels    benchmarks.bench_kernels: the Triton kernels against float64, then GB/s vs copy
#   sweep      benchmarks.bench_sweep --device=cuda: offline state on the GPU vs in host memory
#   vs_nanogpt benchmarks.vs_nanogpt at GPT-2 124M: nanoGPT, ours, ours with ema,bema,lawa
# Needs data/shakespeare_char prepared and, for vs_nanogpt, nanoGPT's train.py, model.py and
# configurator.py in $NANOGPT_DIR (default .nanogpt; never committed: git clone it).
set -uo pipefail
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu_check}
NANOGPT_DIR=${NANOGPT_DIR:-.nanogpt}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
STAGES=${*:-smoke kernels sweep vs_nanogpt}
failed=""

stage() {   # stage NAME SECONDS COMMAND...: run it with a time limit, log it, note a failure
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local code=${PIPESTATUS[0]}
  echo "=== $name: exit $code after $((SECONDS - start)) s" | tee -a "$LOG"
  [ "$code" = 0 ] || failed="$failed $name"
}

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee -a "$LOG"

for s in $STAGES; do
  case $s in
    smoke) stage smoke 300 bash .ci/gpu_smoke.sh ;;
    kernels) stage kernels 150 $PY -m benchmarks.bench_kernels --tune=False --bench_out="$OUT/bench.jsonl" ;;
    sweep) stage sweep 180 $PY -m benchmarks.bench_sweep --device=cuda --ranks=1 \
        --snapshots=6 --settings=8 --bench_out="$OUT/bench.jsonl" ;;
    vs_nanogpt) stage vs_nanogpt 330 $PY -m benchmarks.vs_nanogpt --nanogpt_dir="$NANOGPT_DIR" \
        --device=cuda --preset=gpt2_124m --rounds=1 --max_iters=120 --skip_iters=40 \
        --averaging= --averaging_also=ema,bema,lawa --bench_out="$OUT/bench.jsonl" ;;
    *) echo "unknown stage $s" | tee -a "$LOG"; failed="$failed $s" ;;
  esac
done
echo "gpu_check: stages [$STAGES], failed: [${failed# }]" | tee -a "$LOG"
[ -z "$failed" ]
