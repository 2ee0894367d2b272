#!/usr/bin/env bash
# The measurements of docs/search.md, run one after another (never two at once, except the two
# workers of the last one, which share one study on purpose):
#   1. a 32-trial search of the tutorial network (init N(0, weight_scale) for every weight) over
#      learning rate, momentum and init scale, 2 epochs, median pruning, --batch=8 then --batch=1;
#   2. a 32-run grid sweep of the same network over the same three values, selected on the same
#      validation split (the last 10,000 training images);
#   3. one worker against two workers on one study, 16 trials on a 12,000-image subset.
# Usage: experiments/search_measurements.sh OUT_DIR [DATA_FLAGS...]   (wall times in OUT_DIR/times.txt)
set -euo pipefail
out=${1:?usage: experiments/search_measurements.sh OUT_DIR [DATA_FLAGS...]}
shift
data_flags=("$@")
mkdir -p "$out"
space="learning_rate=loguniform(1e-3,0.3) momentum=uniform(0.5,0.99) weight_scale=loguniform(1e-3,0.3)"
model=(--init=seed --optimizer=momentum --epochs=2 --seed=0 "${data_flags[@]}")

timed() {   # timed NAME COMMAND...: runs the command, logs to OUT/NAME.log, appends its wall time
  local name=$1 start end
  shift
  start=$(date +%s.%N)
  /usr/bin/time -f "max_rss_kb=%M" "$@" >"$out/$name.log" 2>&1
  end=$(date +%s.%N)
  echo "$name wall_s=$(echo "$end - $start" | bc) $(grep -o 'max_rss_kb=[0-9]*' "$out/$name.log" | tail -1)" \
    | tee -a "$out/times.txt"
}

for batch in 8 1; do
  timed "search_batch$batch" python experiments/search.py --workdir="$out/search_batch$batch" "${model[@]}" \
    --space="$space" --trials=32 --batch=$batch --max_parallel=8 --pruner=median --eval_every=260
done

timed grid python experiments/sweep.py --workdir="$out/grid" "${model[@]}" --train_eval=running \
  --validation_size=10000 --max_parallel=8 \
  --sweep="learning_rate=0.003,0.01,0.03,0.1 momentum=0.5,0.75,0.9,0.97 weight_scale=0.01,0.1"

workers=(python experiments/search.py "${model[@]}" --train_subset=12000 --space="$space" --trials=16 --batch=2
         --pruner=none)
timed one_worker "${workers[@]}" --workdir="$out/one_worker"
start=$(date +%s.%N)
"${workers[@]}" --workdir="$out/two_workers" >"$out/two_workers_a.log" 2>&1 &
first=$!
"${workers[@]}" --workdir="$out/two_workers" >"$out/two_workers_b.log" 2>&1
wait "$first"
end=$(date +%s.%N)
echo "two_workers wall_s=$(echo "$end - $start" | bc)" | tee -a "$out/times.txt"
