#!/bin/sh
# Every row of the DP study (conf/dp-study/*.toml) with the given seeds (default 0), then
# the table and the plot. Flower's simulation engine; about 4-5 minutes per run on 2 cores.
#   sh conf/dp-study/run.sh [OUTPUT_DIR] [SEEDS]        (default runs/dp-study "0")
set -eu
out=${1:-runs/dp-study}
seeds=${2:-0}
mkdir -p "$out"
for seed in $seeds; do
  for row in conf/dp-study/*.toml; do
    echo "== $(basename "$row" .toml), seed $seed ($(date +%H:%M:%S))"
    .venv/bin/stamen simulate --nodes 10 --output "$out" --run-config "$row" --run-config "train.seed=$seed" >"$out.$(basename "$row" .toml).$seed.log" 2>&1 \
      || { echo "failed: see $out.$(basename "$row" .toml).$seed.log"; exit 1; }
  done
done
.venv/bin/stamen study "$out"
