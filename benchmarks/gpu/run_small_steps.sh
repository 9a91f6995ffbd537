#!/bin/bash
# Issue 12's shapes in ONE call on a lent NVIDIA machine (after setup_mlx_cuda.sh), ours beside mlx-lm, 7B shape:
# 4x128 with and without checkpointing, Dolly-length batches of 4 and 8 (harness.bench --dolly-lengths: real
# tokens/s over length-sorted batches of Dolly-profile records, up to 512 tokens), 8x512, and 4x512 with
# checkpointing. Each stack runs in its own process (an interrupted call keeps what finished); the per-run
# limits add up to under 600 s. Writes $OUT/results.jsonl, $OUT/log.txt and the table $OUT/table.txt.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
DOLLY=(--dolly-lengths data.max_seq_len=512 --steps 12)
bench 45 --stack ours --batch 4 --seq 128 --steps 10
bench 60 --stack mlx-lm --batch 4 --seq 128 --steps 5
bench 45 --stack ours --batch 4 --seq 128 --checkpointing --steps 10
bench 90 --stack ours --batch 4 "${DOLLY[@]}"  # one compilation per width: about 50 s
bench 75 --stack mlx-lm --batch 4 "${DOLLY[@]}"
bench 60 --stack ours --batch 8 "${DOLLY[@]}"
bench 75 --stack mlx-lm --batch 8 "${DOLLY[@]}"
bench 45 --stack ours --batch 8 --seq 512 --steps 10
bench 45 --stack ours --batch 4 --seq 512 --checkpointing --steps 10 trainer.memory_limit_gb=8.0  # as the flagship
results_table
save_kernel_cache
