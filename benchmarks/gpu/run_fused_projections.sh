#!/bin/bash
# Fused projections (trainer.fuse_projections) against one product per projection, issue 12's shapes on the 7B
# shape, alternating in ONE call on a lent NVIDIA machine (after setup_mlx_cuda.sh), mlx-lm beside them.
#   bash benchmarks/gpu/run_fused_projections.sh fixed   # 4x128 (+ checkpointing), 8x512, 4x512 checkpointed
#   bash benchmarks/gpu/run_fused_projections.sh dolly   # Dolly-length batches of 4 and 8, ours beside mlx-lm
# Each stack runs in its own process; the per-run limits add up to under 600 s. Writes $OUT/results.jsonl,
# $OUT/log.txt and the table $OUT/table.txt.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
case "${1:-fixed}" in
fixed)
  for fuse in false true; do
    bench 45 --stack ours --batch 4 --seq 128 --steps 10 trainer.fuse_projections=$fuse
  done
  bench 60 --stack mlx-lm --batch 4 --seq 128 --steps 5
  for fuse in false true; do
    bench 45 --stack ours --batch 4 --seq 128 --checkpointing --steps 10 trainer.fuse_projections=$fuse
  done
  for fuse in false true; do
    bench 45 --stack ours --batch 8 --seq 512 --steps 10 trainer.fuse_projections=$fuse
  done
  for fuse in false true; do
    bench 45 --stack ours --batch 4 --seq 512 --checkpointing --steps 10 trainer.memory_limit_gb=8.0 \
      trainer.fuse_projections=$fuse
  done
  ;;
dolly)
  DOLLY=(--dolly-lengths data.max_seq_len=512 --steps 12)
  for batch in 4 8; do
    for fuse in false true; do
      bench 60 --stack ours --batch $batch "${DOLLY[@]}" trainer.fuse_projections=$fuse
    done
    bench 90 --stack mlx-lm --batch $batch "${DOLLY[@]}"
  done
  ;;
esac
python3 - "$OUT/results.jsonl" <<'PY' | tee "$OUT/table.txt"
import json, sys
from harness.bench import print_table
print_table([json.loads(line) for line in open(sys.argv[1]) if line.strip()])
PY
save_kernel_cache
