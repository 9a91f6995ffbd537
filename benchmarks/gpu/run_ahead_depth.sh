#!/bin/bash
# Issue 12, session 12, one call: `ab_step.py --compare ahead` at 8 x 512 under other CUDA-graph sizes than
# run_ahead.sh's (SETTINGS, each its own process: MLX reads them once). JSON under $OUT.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
for setting in ${SETTINGS:-MLX_MAX_OPS_PER_BUFFER=100,MLX_MAX_MB_PER_BUFFER=4000 MLX_MAX_OPS_PER_BUFFER=200,MLX_MAX_MB_PER_BUFFER=100000}; do
  echo "== $setting" | tee -a "$OUT/log.txt"
  env $(setting_env "$setting") bash -c "source '$(dirname "$0")/common.sh'; ab --compare ahead --rows 8 --seq 512 \
    --tag _8x512_$(echo "$setting" | tr ',=' '__') model=mistral-7b-shape" | grep -E "^median|^round"
done
