#!/bin/bash
# Issue 12's table in two calls of one lease (PART=1, then PART=2), 7B shape, each stack its own process: the
# large settings and the checkpointed 4 x 128 and a first 4 x 128 round beside mlx-lm (PART=1); a second 4 x 128
# round and Dolly-length batches of 4 and 8 beside mlx-lm (PART=2); PART=1 also times the flagship experiment as
# shipped, and with ROPE_MLX=1 repeats the large rows and the flagship with MLX's rope (QLORA_ROPE=mlx) for their
# peaks (the log names those rows). Writes $OUT/results.jsonl and $OUT/table.txt.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
if [ "${PART:-1}" = 1 ]; then
  bench 100 --stack ours --batch 8 --seq 512 --steps 6
  bench 100 --stack ours --batch 4 --seq 512 --checkpointing trainer.memory_limit_gb=8.0 --steps 6
  bench 60 --stack ours --batch 4 --seq 128 --checkpointing --steps 10
  bench 45 --stack ours --batch 4 --seq 128 --steps 10
  bench 60 --stack mlx-lm --batch 4 --seq 128 --steps 5
  bench 100 --stack ours experiment=mistral7b_dolly_qlora --steps 3 --warmup 1
  if [ -n "$ROPE_MLX" ]; then  # the rows above whose peak the rotary kernel may move, with MLX's rope
    echo "== next rows: QLORA_ROPE=mlx" | tee -a "$OUT/log.txt"
    QLORA_ROPE=mlx bench 100 --stack ours --batch 8 --seq 512 --steps 6
    QLORA_ROPE=mlx bench 100 --stack ours --batch 4 --seq 512 --checkpointing trainer.memory_limit_gb=8.0 --steps 6
    QLORA_ROPE=mlx bench 100 --stack ours experiment=mistral7b_dolly_qlora --steps 3 --warmup 1
  fi
else
  bench 45 --stack ours --batch 4 --seq 128 --steps 10
  bench 60 --stack mlx-lm --batch 4 --seq 128 --steps 5
  bench 90 --stack ours --batch 4 --dolly-lengths data.max_seq_len=512 --steps 12
  bench 75 --stack mlx-lm --batch 4 --dolly-lengths data.max_seq_len=512 --steps 12
  bench 90 --stack ours --batch 8 --dolly-lengths data.max_seq_len=512 --steps 12
  bench 90 --stack mlx-lm --batch 8 --dolly-lengths data.max_seq_len=512 --steps 12
fi
results_table
