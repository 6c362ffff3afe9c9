#!/bin/sh
# Every row of the early-exit study (conf/exit-study/*.toml) with seeds 0, 1, 2, then the
# table and the plot. Runs in Flower's simulation engine with 8 virtual SuperNodes; on 2
# cores about 3.5 minutes per BBC News run and 3 per digits run (24 runs: about 80 minutes).
#   sh conf/exit-study/run.sh [OUTPUT_DIR]        (default runs/exit-study)
exec sh conf/simulate-rows.sh conf/exit-study 8 "${1:-runs/exit-study}" "0 1 2"
