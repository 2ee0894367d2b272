#!/usr/bin/env bash
# Search measurements (docs/search.md: batch8, batch1; the others' last figures: CHANGELOG.md),
# run one after another (never two at once, except the two workers of the last step, which share
# one study on purpose). Steps (default: all, in order):
#   batch8, batch1  a 32-trial search of the tutorial network (init N(0, weight_scale) for every
#                   weight) over learning rate, momentum and init scale, 2 epochs, median pruning,
#                   on the 50,000 training images left by the validation split: --batch=8, --batch=1;
#   subset_search, subset_grid
#                   the same search (--batch=8) and a 32-run grid sweep over the same three values,
#                   both on the first 12,000 training images and selected on the last 2,000 of them;
#   workers         one worker against two workers on one study: 16 trials on the first 6,000 images.
# Usage: experiments/search_measurements.sh OUT_DIR [STEP...]   (wall times in OUT_DIR/times.txt)
set -euo pipefail
out=${1:?usage: experiments/search_measurements.sh OUT_DIR [STEP...]}
shift
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(batch8 batch1 subset_search subset_grid workers)
mkdir -p "$out"
space="learning_rate=loguniform(1e-3,0.3) momentum=uniform(0.5,0.99) weight_scale=loguniform(1e-3,0.3)"
model=(--init=normal --optimizer=momentum --epochs=2 --seed=0)
grid="learning_rate=0.003,0.01,0.03,0.1 momentum=0.5,0.75,0.9,0.97 weight_scale=0.01,0.1"

timed() {   # timed NAME COMMAND...: runs the command, logs to OUT/NAME.log, appends its wall time
  local name=$1 start end
  shift
  start=$(date +%s.%N)
  /usr/bin/time -f "max_rss_kb=%M" "$@" >"$out/$name.log" 2>&1
  end=$(date +%s.%N)
  echo "$name wall_s=$(echo "$end - $start" | bc) $(grep -o 'max_rss_kb=[0-9]*' "$out/$name.log" | tail -1)" \
    | tee -a "$out/times.txt"
}

search() {   # search NAME FLAGS...: a search in OUT/NAME
  local name=$1
  shift
  timed "$name" python experiments/search.py --workdir="$out/$name" "${model[@]}" --space="$space" "$@"
}

for step in "${steps[@]}"; do
  case $step in
    batch8 | batch1)
      search "search_$step" --trials=32 --batch="${step#batch}" --max_parallel=8 --pruner=median --eval_every=260 ;;
    subset_search)
      search subset_search --train_subset=12000 --validation_size=2000 --trials=32 --batch=8 --max_parallel=8 \
        --pruner=median --eval_every=52 ;;
    subset_grid)
      timed subset_grid python experiments/sweep.py --workdir="$out/subset_grid" "${model[@]}" --train_subset=12000 \
        --validation_size=2000 --train_eval=running --max_parallel=8 --sweep="$grid" ;;
    workers)
      workers=(python experiments/search.py "${model[@]}" --space="$space" --train_subset=6000 --trials=16 --batch=2
               --pruner=none)
      timed one_worker "${workers[@]}" --workdir="$out/one_worker"
      start=$(date +%s.%N)
      "${workers[@]}" --workdir="$out/two_workers" >"$out/two_workers_a.log" 2>&1 &
      first=$!
      "${workers[@]}" --workdir="$out/two_workers" >"$out/two_workers_b.log" 2>&1
      wait "$first"
      end=$(date +%s.%N)
      echo "two_workers wall_s=$(echo "$end - $start" | bc)" | tee -a "$out/times.txt" ;;
    *)
      echo "unknown step $step: use batch8, batch1, subset_search, subset_grid or workers" >&2
      exit 2 ;;
  esac
done
