#!/bin/sh
# Every row of the FedSpine study (conf/fedspine-study/*.toml) on the emulated testbed,
# each on wifi and 5g (same devices, same seed). Needs root (namespaces, tbf, cgroups).
#   sudo sh conf/fedspine-study/run.sh [OUTPUT_DIR]        (default runs/fedspine-study)
set -eu
out=${1:-runs/fedspine-study}
mkdir -p "$out"
for row in conf/fedspine-study/*.toml; do
  name=$(basename "$row" .toml)
  echo "== $name ($(date +%H:%M:%S))"
  .venv/bin/stamen testbed compare --network wifi,5g --devices raspberry-pi-4,raspberry-pi-4,jetson-orin-nano,gpu-server \
    --output "$out/$name" --run-config "$row" >"$out.$name.log" 2>&1 || { echo "failed: see $out.$name.log"; exit 1; }
done
