#!/bin/bash
# Issue 12, session 13, one call: the adapters' gradients laid out by rows (their own backward pass) against by
# columns (MLX's vjp of the transposed views), whose optimizer update ran MLX's strided fused kernel: 448 kernels,
# 11.0 ms of GPU time a step at 8 x 512 in session 12's trace. ab_step.py --compare lora-vjp at 8 x 512 (whole-graph
# step) and 4 x 128 (the layer-by-layer step `auto` picks), then each way traced at 8 x 512.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
AB_TIMEOUT=170 ab --compare lora-vjp --tag _8x512 --rows 8 --seq 512 --rounds 3 model=mistral-7b-shape
AB_TIMEOUT=120 ab --compare lora-vjp --tag _4x128 --rows 4 --seq 128 --rounds 3 model=mistral-7b-shape
for how in mlx rows; do
  timeout 150 python3 benchmarks/gpu/kernel_trace.py --compare lora-vjp --variant $how --tag _lora_vjp_$how \
    model=mistral-7b-shape 2>>"$OUT/log.txt" | grep -v Warning | head -60
done
