#!/bin/bash
# Issue 12, for the next GPU session, one call: session 13's two changes to the whole-graph step, each against what
# it replaced, in one process each (`ab_step.py`), then the step as shipped traced beside the old layout.
# - adapter-layout: the adapters and their optimizer state by rows (before) against by columns, as their gradients
#   come (`harness.step.standard.lay_out_by_columns`). Session 12's trace of the 8 x 512 step showed the fused AdamW
#   update of column-major gradients beside row-major parameters in MLX's strided kernel: 448 kernels, 11.0 ms.
# - mlp-gate: `silu(gate) * up` differentiated by MLX (before) against in one pass with its own backward pass
#   (`models.activations`), which stores neither `sigmoid(gate)` nor `silu(gate)` (the peak should fall).
# In the traces the update kernel's name ends in `_contiguous` or `_strided`.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
AB_TIMEOUT=170 ab --compare adapter-layout --tag _8x512 --rows 8 --seq 512 --rounds 3 model=mistral-7b-shape
AB_TIMEOUT=170 ab --compare mlp-gate --tag _8x512 --rows 8 --seq 512 --rounds 3 model=mistral-7b-shape
AB_TIMEOUT=120 ab --compare mlp-gate --tag _4x128 --rows 4 --seq 128 --rounds 3 model=mistral-7b-shape
for layout in columns rows; do
  echo "== kernel_trace adapter-layout $layout" | tee -a "$OUT/log.txt"
  timeout 150 python3 benchmarks/gpu/kernel_trace.py --compare adapter-layout --variant $layout \
    --tag _adapter_layout_$layout model=mistral-7b-shape 2>>"$OUT/log.txt" | grep -v Warning | head -60
done
