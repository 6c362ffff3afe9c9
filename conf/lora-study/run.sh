#!/bin/sh
# Every row of the LoRA study (conf/lora-study/*.toml) with seeds 0, 1, 2, then the table
# and the plot. Runs in Flower's simulation engine; about 4 minutes per run on 2 cores (21 runs: about 85 minutes).
#   sh conf/lora-study/run.sh [OUTPUT_DIR]        (default runs/lora-study)
exec sh conf/simulate-rows.sh conf/lora-study 10 "${1:-runs/lora-study}" "0 1 2"
