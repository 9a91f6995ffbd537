#!/bin/bash
# Issue 12, session 8: in ONE process each (benchmarks/ab_step.py), 7B shape. PART=1: the optimizer update on
# arrays kept stacked by shape against array by array (4x128, 4x128 checkpointed, 8x512), and the checkpointed
# step's dense weights kept for the backward pass against rebuilt there (4x128, 4x512 under the 8 GB limit).
# PART=2: the update in the checkpointed step only (4x128; 4x512 under the 8 GB limit). JSON under $OUT.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
CKPT=trainer.gradient_checkpointing=true
ab() { echo "== ab_step $*" | tee -a "$OUT/log.txt"; timeout 150 python3 benchmarks/ab_step.py "$@" 2>>"$OUT/log.txt" | grep -v Warning; }
if [ "${PART:-1}" = 1 ]; then
  ab --compare update --tag _4x128 model=mistral-7b-shape
  ab --compare update --tag _4x128_ckpt model=mistral-7b-shape $CKPT
  ab --compare backward-weights --tag _4x128 model=mistral-7b-shape $CKPT
  ab --compare backward-weights --tag _4x512 --seq 512 --rounds 2 model=mistral-7b-shape $CKPT trainer.memory_limit_gb=8.0
  ab --compare update --tag _8x512 --rows 8 --seq 512 --rounds 2 model=mistral-7b-shape
else
  ab --compare update --tag _4x128_ckpt_2 --rounds 4 model=mistral-7b-shape $CKPT
  ab --compare update --tag _4x512_ckpt_limit8 --seq 512 --rounds 3 model=mistral-7b-shape $CKPT trainer.memory_limit_gb=8.0
fi
save_kernel_cache
