#!/bin/sh
# Every row of the LoRA study (conf/lora-study/*.toml) with seeds 0, 1, 2, then the table
# and the plot. Runs in Flower's simulation engine; about 4 minutes per run on 2 cores (21 runs: about 85 minutes).
#   sh conf/lora-study/run.sh [OUTPUT_DIR]        (default runs/lora-study)
set -eu
out=${1:-runs/lora-study}
mkdir -p "$out"
for seed in 0 1 2; do
  for row in conf/lora-study/*.toml; do
    echo "== $(basename "$row" .toml), seed $seed"
    .venv/bin/stamen simulate --nodes 10 --output "$out" --run-config "$row" --run-config "train.seed=$seed" >"$out.$(basename "$row" .toml).$seed.log" 2>&1 \
      || { echo "failed: see $out.$(basename "$row" .toml).$seed.log"; exit 1; }
  done
done
.venv/bin/stamen study "$out"
