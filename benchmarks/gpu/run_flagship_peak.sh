#!/bin/bash
# What sets the flagship experiment's peak (experiment=mistral7b_dolly_qlora, 7B shape), each variant in its own
# process: as shipped (MLX's memory limit at 8 GB), the limit at 7.5 and 7.0 GB, and MLX's own dequantization
# instead of ours (QLORA_DEQUANTIZE=mlx), alternating over ROUNDS rounds. Writes $OUT/results.jsonl and the
# table $OUT/table.txt (the environment variable is not a column: the log says which row ran with it).
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
FLAGSHIP=(--stack ours experiment=mistral7b_dolly_qlora --steps 3 --warmup 1)
for round in $(seq "${ROUNDS:-1}"); do
  bench 100 "${FLAGSHIP[@]}"
  bench 100 "${FLAGSHIP[@]}" trainer.memory_limit_gb=7.5
  bench 100 "${FLAGSHIP[@]}" trainer.memory_limit_gb=7.0
  echo "== next row: QLORA_DEQUANTIZE=mlx" | tee -a "$OUT/log.txt"
  QLORA_DEQUANTIZE=mlx bench 100 "${FLAGSHIP[@]}"
done
results_table
