#!/bin/sh
# Every row of the FedSpine study (conf/fedspine-study/*.toml) on the emulated testbed: the
# same three devices (2x raspberry-pi-4, jetson-orin-nano: with one torch thread each they
# fit this 2-core host), nodes alternately on wifi and 5g, same seeds. Needs root (namespaces, tbf, cgroups). About 8-10 min per row.
#   sudo sh conf/fedspine-study/run.sh [OUTPUT_DIR]        (default runs/fedspine-study)
# then: .venv/bin/python -m cli.fedspine_study OUTPUT_DIR   (the table and figures of docs/pruning.md)
set -eu
out=${1:-runs/fedspine-study}
mkdir -p "$out"
for row in conf/fedspine-study/*.toml; do
  name=$(basename "$row" .toml)
  echo "== $name ($(date +%H:%M:%S))"
  .venv/bin/stamen testbed run --network wifi,5g --threads 1 --devices raspberry-pi-4,raspberry-pi-4,jetson-orin-nano \
    --output "$out/$name" --run-config "$row" >"$out.$name.log" 2>&1 || { echo "failed: see $out.$name.log"; exit 1; }
done
