#!/bin/bash
# Our 7B-shape GPU benchmarks for BENCHMARKS.md, for one call on a lent NVIDIA machine (after setup_mlx_cuda.sh).
# Each stack runs in its own process (harness.bench --stack) so an interrupted call still keeps what finished.
#   bash benchmarks/gpu/run_7b.sh [MEMORY_LIMIT_GB]     (limit for the checkpointed 4 x 512 run; default 7.5)
OUT=${OUT:-/tmp/bench_out}
LIMIT=${1:-7.5}
mkdir -p "$OUT"
source "$(dirname "$0")/common.sh"
bench 200 --stack ours --batch 8 --seq 512
python3 -m benchmarks.gpu.memory_probe model=mistral-7b-shape --batch 4 --seq 512 --checkpointing \
  --limits 0 "$LIMIT" 6.5 2>>"$OUT/log.txt" | tee -a "$OUT/probe.txt"
bench 120 --stack ours --batch 4 --seq 512 --checkpointing "trainer.memory_limit_gb=$LIMIT"
save_kernel_cache
