#!/bin/bash
# Issue 12's 4 x 128 target, ours (trainer.train_step=auto) beside mlx-lm, 7B shape, over ROUNDS (default 3)
# rounds in ONE call, each stack in its own process, alternating: between processes the host's speed moves by as
# much as the effects measured, so the table shows every round. DOLLY=1 adds a round of Dolly-length batches of
# 4 at the end, DOLLY=2 one of batches of 8 as well. Writes $OUT/results.jsonl and $OUT/table.txt.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
for round in $(seq "${ROUNDS:-3}"); do
  bench 45 --stack ours --batch 4 --seq 128 --steps 10
  bench 60 --stack mlx-lm --batch 4 --seq 128 --steps 5
done
if [ -n "$DOLLY" ]; then
  bench 90 --stack ours --batch 4 --dolly-lengths data.max_seq_len=512 --steps 12
  bench 75 --stack mlx-lm --batch 4 --dolly-lengths data.max_seq_len=512 --steps 12
fi
if [ "$DOLLY" = 2 ]; then
  bench 90 --stack ours --batch 8 --dolly-lengths data.max_seq_len=512 --steps 12
  bench 90 --stack mlx-lm --batch 8 --dolly-lengths data.max_seq_len=512 --steps 12
fi
results_table
