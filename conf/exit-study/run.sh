#!/bin/sh
# Every row of the early-exit study (conf/exit-study/*.toml) with seeds 0, 1, 2, then the
# table and the plot. Runs in Flower's simulation engine with 8 virtual SuperNodes; on 2
# cores about 3.5 minutes per BBC News run and 3 per digits run (24 runs: about 80 minutes).
#   sh conf/exit-study/run.sh [OUTPUT_DIR]        (default runs/exit-study)
set -eu
out=${1:-runs/exit-study}
mkdir -p "$out"
for seed in 0 1 2; do
  for row in conf/exit-study/*.toml; do
    name=$(basename "$row" .toml)
    echo "== $name, seed $seed ($(date +%H:%M:%S))"
    .venv/bin/stamen simulate --nodes 8 --output "$out" --run-config "$row" --run-config "train.seed=$seed" >"$out.$name.$seed.log" 2>&1 \
      || { echo "failed: see $out.$name.$seed.log"; exit 1; }
  done
done
.venv/bin/stamen study "$out"
