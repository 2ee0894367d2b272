#!/usr/bin/env bash
# A 12-run comparison (its last figures: CHANGELOG.md): 3 learning rates x 2 pools x 2 seeds,
# 1 epoch each, full MNIST, default recipe, (a) launched one after another through experiments/train.py,
# (b) as one experiments/sweep.py command. Prints the machine load and both wall-clock times.
#
#   bash experiments/sweep_vs_sequential.sh                     # both
#   ONLY=sweep MAX_PARALLEL=6 bash experiments/sweep_vs_sequential.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/mnist}
OUT=${OUT:-/tmp/sweep_vs_sequential}
MAX_PARALLEL=${MAX_PARALLEL:-0}
ONLY=${ONLY:-both}
LRS=(0.0003 0.001 0.003)
mkdir -p "$OUT"

if [[ $ONLY != sequential ]]; then
  rm -rf "$OUT/sweep"
  echo "sweep: load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  start=$(date +%s.%N)
  python experiments/sweep.py --data_dir="$DATA" --epochs=1 --workdir="$OUT/sweep" \
    --max_parallel="$MAX_PARALLEL" --sweep="learning_rate=$(IFS=,; echo "${LRS[*]}") pool=max,avg seed=0,1" \
    > "$OUT/sweep.log" 2>&1
  end=$(date +%s.%N)
  echo "sweep: $(echo "$end - $start" | bc) s (max_parallel=$MAX_PARALLEL); load after: $(cut -d' ' -f1-3 /proc/loadavg)"
fi

if [[ $ONLY != sweep ]]; then
  echo "sequential: load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  start=$(date +%s.%N)
  for lr in "${LRS[@]}"; do for pool in max avg; do for seed in 0 1; do
    python experiments/train.py --data_dir="$DATA" --epochs=1 --learning_rate="$lr" --pool="$pool" \
      --seed="$seed" >> "$OUT/sequential.log" 2>&1
  done; done; done
  end=$(date +%s.%N)
  echo "sequential: $(echo "$end - $start" | bc) s; load after: $(cut -d' ' -f1-3 /proc/loadavg)"
fi
