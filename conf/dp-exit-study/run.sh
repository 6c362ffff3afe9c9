#!/bin/sh
# ReeFL with and without local DP-SGD (conf/dp-exit-study/*.toml) with the given seeds
# (default 0), then the table. Flower's simulation engine, 8 virtual SuperNodes; about
# 4-5 minutes per run on 2 cores.
#   sh conf/dp-exit-study/run.sh [OUTPUT_DIR] [SEEDS]        (default runs/dp-exit-study "0")
exec sh conf/simulate-rows.sh conf/dp-exit-study 8 "${1:-runs/dp-exit-study}" "${2:-0}"
