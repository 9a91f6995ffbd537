#!/bin/bash
# Issue 12, for the next GPU session, one call: the whole-graph step with the adapters and their optimizer state laid
# out by rows (before session 13) against by columns, as their gradients come (`harness.step.standard
# .lay_out_by_columns`, as shipped). Session 12's trace of the 8 x 512 step showed the fused AdamW update of the
# column-major gradients beside row-major parameters and moments in MLX's strided kernel: 448 kernels, 11.0 ms a
# step. `ab_step.py --compare adapter-layout` at 8 x 512 and at Dolly's batch 8 width (8 x 192, the whole-graph
# step), then each layout traced at 8 x 512 (the AdamW kernel's name ends in `_contiguous` or `_strided`).
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
AB_TIMEOUT=170 ab --compare adapter-layout --tag _8x512 --rows 8 --seq 512 --rounds 3 model=mistral-7b-shape
AB_TIMEOUT=120 ab --compare adapter-layout --tag _8x192 --rows 8 --seq 192 --rounds 3 model=mistral-7b-shape \
  trainer.train_step=standard
for layout in rows columns; do
  echo "== kernel_trace adapter-layout $layout" | tee -a "$OUT/log.txt"
  timeout 150 python3 benchmarks/gpu/kernel_trace.py --compare adapter-layout --variant $layout \
    --tag _adapter_layout_$layout model=mistral-7b-shape 2>>"$OUT/log.txt" | grep -v Warning | head -60
done
