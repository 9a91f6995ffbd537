#!/bin/bash
# Issue 12, session 8: the checkpointed 4x128 step's peak by quantization scheme (the 6 GiB target), 7B shape, each
# run in its own process: groups of 64 (the shape's default), row-wise (the flagship's scheme, no per-group
# scales), row-wise under a 6 GB memory limit. Writes $OUT/results.jsonl and $OUT/table.txt.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
bench 45 --stack ours --batch 4 --seq 128 --checkpointing --steps 10
bench 45 --stack ours --batch 4 --seq 128 --checkpointing --steps 10 quant=rowwise4
bench 45 --stack ours --batch 4 --seq 128 --checkpointing --steps 10 quant=rowwise4 trainer.memory_limit_gb=6.0
results_table
