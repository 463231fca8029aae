#!/usr/bin/env bash
# The averaging-baselines experiment in one command: train once with snapshots, then run every
# averaging method over them offline (one pass), print the table and write the plot.
#   bash compare.sh                  # the default Shakespeare model on CPU (~20 min on 2 cores)
#   bash compare.sh owt              # GPT-2 124M on OpenWebText, LAWA's recipe, on 8 GPUs
# Extra arguments go to train.py, e.g. `bash compare.sh shakespeare --max_iters=1000`.
set -euo pipefail
cd "$(dirname "$0")"
experiment="${1:-shakespeare}"
shift || true
case "$experiment" in
  shakespeare)
    python train.py config/compare_shakespeare.py "$@"
    python average.py config/avg_compare_shakespeare.py
    mkdir -p docs/img && cp out/compare_shakespeare/averaging/plot.png docs/img/compare_shakespeare.png
    echo "results: out/compare_shakespeare/averaging/{results.csv,plot.png} (plot also in docs/img/compare_shakespeare.png)" ;;
  owt)
    torchrun --standalone --nproc_per_node="${NPROC:-8}" train.py config/train_small_lawa.py \
        --out_dir=out/compare_owt --averaging= "$@"
    python average.py config/avg_compare_owt.py
    echo "results: out/compare_owt/averaging/{results.csv,plot.png}" ;;
  *)
    echo "usage: bash compare.sh [shakespeare|owt] [--train_key=value ...]" >&2
    exit 2 ;;
esac
