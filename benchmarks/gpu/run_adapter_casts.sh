#!/bin/bash
# Issue 12, session 9: the adapters cast to bfloat16 where each is used against their stacks cast once a step
# (benchmarks/ab_step.py --compare adapter-casts, ONE process per setting), 7B shape, in both steps; then the
# flagship experiment's settings (r=16, dropout, 4 x 512 x 4 accumulation, checkpointed): the update per array
# against on stacks, and MLX's memory limit at 8.0 / 7.5 / 7.0 GB, for its peak; Python's collector frozen or
# not at 4 x 128; last the flagship as shipped (harness.bench). JSON under $OUT.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
CKPT=trainer.gradient_checkpointing=true
FLAGSHIP="--seq 512 --accum 4 --steps 3 --warmup 1 model=mistral-7b-shape experiment=mistral7b_dolly_qlora"
ab --compare adapter-casts --tag _4x128_whole model=mistral-7b-shape trainer.train_step=standard
ab --compare adapter-casts --tag _4x128_layerwise model=mistral-7b-shape trainer.train_step=layerwise
ab --compare adapter-casts --tag _4x512_ckpt_limit8 --seq 512 --rounds 2 model=mistral-7b-shape $CKPT trainer.memory_limit_gb=8.0
ab --compare adapter-casts --tag _8x512_whole --rows 8 --seq 512 --rounds 2 model=mistral-7b-shape trainer.train_step=standard
ab --compare update --tag _flagship --rounds 2 $FLAGSHIP
ab --compare memory-limit --tag _flagship --rounds 1 $FLAGSHIP
ab --compare gc --tag _4x128 model=mistral-7b-shape
bench 150 --stack ours experiment=mistral7b_dolly_qlora --steps 4 --warmup 1
results_table
save_kernel_cache
