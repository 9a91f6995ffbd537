#!/bin/bash
# Issue 12, session 11, one call: where the whole-graph step's update leaves the GPU idle at 8 x 512, 7B shape.
# kernel_trace.py (the GPU's own clock) of the per-array update as shipped, of the update on stacked adapters
# (`TrainStep(stack_adapters=True)`: 14 joins, norms and AdamW kernels instead of 448 each) and of the norms summed
# in the gradients' own layout; then ab_step.py (both variants in one process) for the update and the norm forms,
# and the trace with a larger CUDA graph cache if time is left. JSON under $OUT.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
BUDGET=${BUDGET:-560}
trace() {
  [ "$SECONDS" -lt $((BUDGET - 70)) ] || { echo "== skipped (time): kernel_trace $*"; return; }
  echo "== kernel_trace $*" | tee -a "$OUT/log.txt"
  timeout 120 python3 benchmarks/gpu/kernel_trace.py --top 12 "$@" 2>>"$OUT/log.txt" | grep -v Warning
}
trace --tag _8x512
trace --tag _8x512_stacks --compare update --variant stacks
AB_TIMEOUT=150 ab --compare update --tag _8x512 --rows 8 --seq 512 --rounds 2 model=mistral-7b-shape
trace --tag _8x512_norm_in_place --compare norm --variant in-place
[ "$SECONDS" -lt $((BUDGET - 160)) ] && AB_TIMEOUT=150 ab --compare norm --tag _8x512 --rows 8 --seq 512 --rounds 2 model=mistral-7b-shape
MLX_CUDA_GRAPH_CACHE_SIZE=2000 trace --tag _8x512_graph_cache_2000
echo "elapsed $SECONDS s"
