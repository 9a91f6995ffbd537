#!/bin/bash
# Issue 12, session 10, one call, 7B shape: at 8 x 512 (the whole-graph step), the adapters' scale as the GEMM's
# alpha against on B's cast, and the update's squared norms as dot products against sums of squares (ab_step.py, one
# process each); the kernel trace of 8 x 512 as shipped; then harness.bench for issue 12's settings. JSON under $OUT.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
ab --compare lora-scale --tag _8x512 --rows 8 --seq 512 --rounds 2 model=mistral-7b-shape
ab --compare norm --tag _8x512 --rows 8 --seq 512 --rounds 2 model=mistral-7b-shape
echo "== kernel_trace 8x512" | tee -a "$OUT/log.txt"
timeout 120 python3 benchmarks/gpu/kernel_trace.py --tag _8x512 2>>"$OUT/log.txt" | grep -v Warning | head -24
bench 100 --stack ours --batch 8 --seq 512 --steps 6
bench 100 --stack ours --batch 4 --seq 512 --checkpointing trainer.memory_limit_gb=8.0 --steps 6
bench 100 --stack ours --batch 4 --seq 128 --steps 10
results_table
