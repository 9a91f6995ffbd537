#!/bin/bash
# Issue 12: the optimizer update on adapters kept stacked by shape against array by array, in ONE process per
# setting (benchmarks/ab_step.py --compare update switches both steps' update), 7B shape. PART=1 (session 8, with
# the copies since removed): 4x128, 4x128 checkpointed, 8x512, and the checkpointed step's dense weights kept for
# the backward pass against rebuilt (4x128, 4x512 under the 8 GB limit). PART=2: the checkpointed step only
# (4x128; 4x512 under the 8 GB limit). PART=3 (after the views fix): both steps at 4x128 and 8x512, the
# checkpointed one at 4x512 under the limit, the two steps against each other at 4x128, then the flagship as
# shipped. JSON under $OUT.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
CKPT=trainer.gradient_checkpointing=true
case "${PART:-1}" in
1)
  ab --compare update --tag _4x128 model=mistral-7b-shape
  ab --compare update --tag _4x128_ckpt model=mistral-7b-shape $CKPT
  ab --compare backward-weights --tag _4x128 model=mistral-7b-shape $CKPT
  ab --compare backward-weights --tag _4x512 --seq 512 --rounds 2 model=mistral-7b-shape $CKPT trainer.memory_limit_gb=8.0
  ab --compare update --tag _8x512 --rows 8 --seq 512 --rounds 2 model=mistral-7b-shape ;;
2)
  ab --compare update --tag _4x128_ckpt_2 --rounds 4 model=mistral-7b-shape $CKPT
  ab --compare update --tag _4x512_ckpt_limit8 --seq 512 --rounds 3 model=mistral-7b-shape $CKPT trainer.memory_limit_gb=8.0 ;;
3)
  ab --compare update --tag _4x128_whole model=mistral-7b-shape trainer.train_step=standard
  ab --compare update --tag _4x128_layerwise model=mistral-7b-shape trainer.train_step=layerwise
  ab --compare update --tag _8x512_whole --rows 8 --seq 512 --rounds 2 model=mistral-7b-shape trainer.train_step=standard
  ab --compare update --tag _4x512_ckpt_limit8 --seq 512 --rounds 2 model=mistral-7b-shape $CKPT trainer.memory_limit_gb=8.0
  ab --compare train-step --tag _4x128_views model=mistral-7b-shape
  bench 150 --stack ours experiment=mistral7b_dolly_qlora --steps 4 --warmup 1
  results_table ;;
esac
save_kernel_cache
