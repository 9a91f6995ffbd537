#!/bin/bash
# Issue 12, session 8: the checkpointed (layer-by-layer) step at small and Dolly-length batches, 7B shape, each run
# in its own process: 4x128 under memory limits (the 6 GiB target), Dolly-length batches of 4 with and without
# checkpointing, 8x512 checkpointed, and 4x128 both ways again. Writes $OUT/results.jsonl and $OUT/table.txt.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
DOLLY=(--dolly-lengths data.max_seq_len=512 --steps 12)
bench 45 --stack ours --batch 4 --seq 128 --checkpointing --steps 10 trainer.memory_limit_gb=6.0
bench 45 --stack ours --batch 4 --seq 128 --checkpointing --steps 10 trainer.memory_limit_gb=5.5
bench 90 --stack ours --batch 4 "${DOLLY[@]}"
bench 90 --stack ours --batch 4 --checkpointing "${DOLLY[@]}"
bench 45 --stack ours --batch 8 --seq 512 --checkpointing --steps 10
bench 45 --stack ours --batch 4 --seq 128 --steps 10
bench 45 --stack ours --batch 4 --seq 128 --checkpointing --steps 10
results_table
