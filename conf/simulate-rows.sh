#!/bin/sh
# Run every row (*.toml) of a study directory for each seed in Flower's simulation engine,
# then `stamen study` over the output: what each study's run.sh calls.
#   sh conf/simulate-rows.sh ROWS_DIR NODES OUTPUT_DIR "SEEDS"
# Each run's log goes to OUTPUT_DIR.<row>.<seed>.log; the first failure stops the study.
set -eu
[ $# -eq 4 ] || { echo "usage: sh conf/simulate-rows.sh ROWS_DIR NODES OUTPUT_DIR \"SEEDS\"" >&2; exit 2; }
rows=$1 nodes=$2 out=$3 seeds=$4
ls "$rows"/*.toml >/dev/null 2>&1 || { echo "no *.toml rows in $rows" >&2; exit 2; }
mkdir -p "$out"
for seed in $seeds; do
  for row in "$rows"/*.toml; do
    name=$(basename "$row" .toml)
    echo "== $name, seed $seed ($(date +%H:%M:%S))"
    .venv/bin/stamen simulate --nodes "$nodes" --output "$out" --run-config "$row" --run-config "train.seed=$seed" >"$out.$name.$seed.log" 2>&1 \
      || { echo "failed: see $out.$name.$seed.log"; exit 1; }
  done
done
.venv/bin/stamen study "$out"
