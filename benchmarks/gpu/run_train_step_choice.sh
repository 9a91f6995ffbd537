#!/bin/bash
# Issue 12, session 8: which training step is faster without checkpointing, 7B shape. In ONE process per shape
# (benchmarks/ab_step.py --compare train-step): the whole-graph step against the layer-by-layer one at 4x128,
# 4x256, 4x512 and 8x512; then, each in its own process, what trainer.train_step=auto gives beside mlx-lm at
# 4x128 and on Dolly-length batches of 4. Writes $OUT/ab_*.json, $OUT/results.jsonl and $OUT/table.txt.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
AB_TIMEOUT=120
ab --compare train-step --tag _4x128 model=mistral-7b-shape
ab --compare train-step --tag _4x256 --seq 256 --rounds 2 model=mistral-7b-shape
ab --compare train-step --tag _4x512 --seq 512 --rounds 2 model=mistral-7b-shape
ab --compare train-step --tag _8x512 --rows 8 --seq 512 --rounds 2 model=mistral-7b-shape
DOLLY=(--dolly-lengths data.max_seq_len=512 --steps 12)
bench 45 --stack ours --batch 4 --seq 128 --steps 10
bench 60 --stack mlx-lm --batch 4 --seq 128 --steps 5
bench 80 --stack ours --batch 4 "${DOLLY[@]}"
bench 75 --stack mlx-lm --batch 4 "${DOLLY[@]}"
results_table
