#!/bin/bash
# Issue 12, session 10, one call: what a rank-8 LoRA branch costs at 8 x 512 tokens, piece by piece (lora_probe.py,
# 7B shapes), then PROCESSES separate 4 x 128 processes of `ab_step.py --compare threads --thread-cpu` (the main
# thread's user and system time and page faults a step, fast processes beside slow ones). JSON and logs under $OUT.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
echo "== lora_probe" | tee -a "$OUT/log.txt"
timeout 200 python3 benchmarks/gpu/lora_probe.py 2>>"$OUT/log.txt" | grep -v Warning
AB_TIMEOUT=100
for i in $(seq "${PROCESSES:-4}"); do
  ab --compare threads --thread-cpu --rounds 1 --tag "_$i" model=mistral-7b-shape
done
