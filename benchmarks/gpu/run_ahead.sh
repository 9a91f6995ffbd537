#!/bin/bash
# Issue 12, session 10, one call: the next step built while the device runs the current one (harness.step.ahead)
# against each step evaluated before the next is built, in one process per setting (ab_step.py --compare ahead):
# 8 x 512 and 4 x 128 with the whole-graph step; the two steps at 4 x 128 as the loop now runs them; the kernel
# trace of 8 x 512 as the loop runs it (GPU busy time beside wall time); harness.bench 8 x 512 and Dolly lengths at
# batch 8 (the whole-graph step). JSON and logs under $OUT.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
ab() { echo "== ab_step $*" | tee -a "$OUT/log.txt"; timeout 150 python3 benchmarks/ab_step.py "$@" 2>>"$OUT/log.txt" | grep -v Warning; }
ab --compare ahead --tag _8x512 --rows 8 --seq 512 --rounds 2 model=mistral-7b-shape
ab --compare ahead --tag _4x128_standard --rounds 3 model=mistral-7b-shape trainer.train_step=standard
ab --compare train-step --ahead --tag _4x128_ahead --rounds 3 model=mistral-7b-shape
echo "== kernel_trace 8x512" | tee -a "$OUT/log.txt"
timeout 150 python3 benchmarks/gpu/kernel_trace.py --tag _8x512_ahead 2>>"$OUT/log.txt" | grep -v Warning | head -14
bench 150 --stack ours --batch 8 --seq 512 --steps 5
bench 200 --stack ours --batch 8 --dolly-lengths --steps 12
results_table
