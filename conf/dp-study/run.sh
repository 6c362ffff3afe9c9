#!/bin/sh
# Every row of the DP study (conf/dp-study/*.toml) with the given seeds (default 0), then
# the table and the plot. Flower's simulation engine; about 4-5 minutes per run on 2 cores.
#   sh conf/dp-study/run.sh [OUTPUT_DIR] [SEEDS]        (default runs/dp-study "0")
exec sh conf/simulate-rows.sh conf/dp-study 10 "${1:-runs/dp-study}" "${2:-0}"
