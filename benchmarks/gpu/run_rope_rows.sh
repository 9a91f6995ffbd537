#!/bin/bash
# Issue 12, session 12, one call: the rotary kernel leaving its output in the projection's rows, handed on as a
# heads-first view (`kernel-rows`), against MLX's rope and the heads-first kernel: its CUDA tests, then
# `ab_step.py --compare rope` at 8 x 512 (speed and the whole-graph step's peak, which the heads-first kernel
# raised by 1.0 GB).
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -m pytest --noconftest -q -p no:cacheprovider tests/models/test_rope_kernels.py \
  2>&1 | tail -4 | tee -a "$OUT/log.txt"
AB_TIMEOUT=150 ab --compare rope --tag _8x512_rows --rows 8 --seq 512 --rounds 2 model=mistral-7b-shape
