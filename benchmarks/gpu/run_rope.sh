#!/bin/bash
# Issue 12, session 11, one call, 7B shape: the rotary-embedding kernel (models/rope_kernels.py). Its CUDA tests
# (values and gradients against mx.fast.rope), then ab_step.py --compare rope (MLX's rope on the transposed view
# against the kernel, in one process) at 8 x 512 and 4 x 128, and the kernel trace of 8 x 512 with the kernel.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
# pytest from the wheels directory; the machine's own plugins are not loaded (one of them breaks this pytest)
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -m pytest --noconftest -q -p no:cacheprovider tests/models/test_rope_kernels.py \
  tests/models/test_dequantize_kernels.py 2>&1 | tail -4 | tee -a "$OUT/log.txt"
AB_TIMEOUT=120 ab --compare rope --tag _8x512 --rows 8 --seq 512 --rounds 2 model=mistral-7b-shape
AB_TIMEOUT=100 ab --compare rope --tag _4x128 --rounds 3 model=mistral-7b-shape
echo "== kernel_trace 8x512 (rope kernel)" | tee -a "$OUT/log.txt"
timeout 120 python3 benchmarks/gpu/kernel_trace.py --tag _8x512_rope --top 10 2>>"$OUT/log.txt" | grep -v Warning
echo "elapsed $SECONDS s"
