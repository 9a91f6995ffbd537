#!/bin/bash
# Issue 12, session 11, one call, 7B shape: the layer-by-layer step's B views carrying the adapters' scale
# (folded into the stacks' cast) against the scale as each GEMM's alpha (ab_step.py --compare view-scale, one
# process each), at 4 x 128 (`auto`: layer by layer) and 4 x 512 checkpointed under memory_limit_gb=8.0.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
AB_TIMEOUT=100 ab --compare view-scale --tag _4x128 --rounds 3 model=mistral-7b-shape
AB_TIMEOUT=100 ab --compare view-scale --tag _4x512_ckpt --rows 4 --seq 512 --rounds 2 model=mistral-7b-shape \
  trainer.gradient_checkpointing=true trainer.memory_limit_gb=8.0
