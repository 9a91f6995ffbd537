#!/bin/bash
# Issue 12: MLX's CUDA backend launches kernels as CUDA graphs of MLX_MAX_OPS_PER_BUFFER (20) operations, keeps up
# to MLX_CUDA_GRAPH_CACHE_SIZE (100) instantiated graphs keyed by their topology, and clears the whole cache when
# it overflows. Ours (harness.bench, 7B shape, 4 x 128, trainer.train_step=auto) with a cache of 100 (MLX's
# default), 1000 and 4000 graphs, ROUNDS times (default 2), alternating, each its own process (MLX reads the
# variable once). Writes $OUT/results.jsonl and the table $OUT/table.txt; the log says which row had which size.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
for round in $(seq "${ROUNDS:-2}"); do
  for size in ${SIZES:-100 1000 4000}; do
    echo "== next row: MLX_CUDA_GRAPH_CACHE_SIZE=$size" | tee -a "$OUT/log.txt"
    MLX_CUDA_GRAPH_CACHE_SIZE=$size bench 45 --stack ours --batch 4 --seq 128 --steps 10
  done
done
results_table
