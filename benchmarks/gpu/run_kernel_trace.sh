#!/bin/bash
# Issue 12, session 10, one call: the GPU's own account of a step (kernel_trace.py: CUPTI through PyTorch's
# profiler in MLX's process), 7B shape: 8 x 512 (the whole-graph step), then 4 x 128 with the layer-by-layer step
# (`auto`) in two processes and with the whole-graph step. JSON under $OUT.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
trace() { echo "== kernel_trace $*" | tee -a "$OUT/log.txt"; timeout 150 python3 benchmarks/gpu/kernel_trace.py "$@" 2>>"$OUT/log.txt" | grep -v Warning; }
trace --tag _8x512
trace --rows 4 --seq 128 --steps 3 --tag _4x128_a
trace --rows 4 --seq 128 --steps 3 --tag _4x128_b
trace --rows 4 --seq 128 --steps 3 --tag _4x128_standard model=mistral-7b-shape trainer.train_step=standard
