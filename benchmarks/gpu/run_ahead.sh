#!/bin/bash
# Issue 12, session 12, one call: the whole-graph step with the next step's gradient graph built while the device
# finishes the current one (`ab_step.py --compare ahead`), at 8 x 512 under MLX's CUDA-graph defaults and with
# larger graphs (more of the step queued when the host turns to the next graph), and at 4 x 128 (STEPS4=1). JSON
# under $OUT.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
ab --compare ahead --rows 8 --seq 512 --tag _8x512 model=mistral-7b-shape
MLX_MAX_OPS_PER_BUFFER=100 MLX_MAX_MB_PER_BUFFER=100000 ab --compare ahead --rows 8 --seq 512 --tag _8x512_graphs100 \
  model=mistral-7b-shape
[ -n "$STEPS4" ] && ab --compare ahead --rows 4 --seq 128 --tag _4x128 model=mistral-7b-shape trainer.train_step=standard
