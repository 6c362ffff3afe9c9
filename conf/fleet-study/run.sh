#!/bin/sh
# The fleet study: FLoRA, HetLoRA and FlexLoRA on a 1,000-client simulated fleet, on the simulated
# clock of deploy/latency-model.json; then the table (time to 80% accuracy) and the figure.
# About 9 minutes per strategy on 2 cores (the profile query of 1,000 virtual nodes takes 2 of them).
#   sh conf/fleet-study/run.sh [OUTPUT_DIR]        (default runs/fleet-study)
set -eu
out=${1:-runs/fleet-study}
fleet="raspberry-pi-4=600 jetson-orin-nano@5g=300 gpu-server@ethernet=100"
mkdir -p "$out"
for row in conf/fleet-study/*.toml; do
  name=$(basename "$row" .toml)
  echo "== $name ($(date +%H:%M:%S))"
  .venv/bin/stamen simulate --latency-model deploy/latency-model.json --fleet "$fleet" --output "$out" --run-config "$row" \
    >"$out.$name.log" 2>&1 || { echo "failed: see $out.$name.log"; exit 1; }
done
.venv/bin/stamen study "$out" --target 0.8
