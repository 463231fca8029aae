#!/usr/bin/env bash
# The averaging-baselines experiment in one command: train with snapshots, then run every
# averaging method over them offline (one pass), print the table and write the plot.
#   bash compare.sh                  # the default Shakespeare model on CPU, 3 seeds (~50 min on
#                                    # 2 cores): experiments/compare_averaging.py, results and
#                                    # figure in out/experiments/compare_averaging/
#   bash compare.sh shakespeare --seeds=5 --publish=True   # its keys; --publish=True updates
#                                    # docs/img/compare_shakespeare.png
#   bash compare.sh owt              # GPT-2 124M on OpenWebText, LAWA's recipe, on 8 GPUs (one
#                                    # seed; extra arguments go to train.py)
set -euo pipefail
cd "$(dirname "$0")"
experiment="${1:-shakespeare}"
shift || true
case "$experiment" in
  shakespeare)
    python -m experiments.compare_averaging "$@" ;;
  owt)
    torchrun --standalone --nproc_per_node="${NPROC:-8}" train.py config/train_small_lawa.py \
        --out_dir=out/compare_owt --averaging= "$@"
    python average.py config/avg_compare_owt.py
    echo "results: out/compare_owt/averaging/{results.csv,plot.png}" ;;
  *)
    echo "usage: bash compare.sh [shakespeare [--seeds=N] [--publish=True] | owt [--train_key=value ...]]" >&2
    exit 2 ;;
esac
