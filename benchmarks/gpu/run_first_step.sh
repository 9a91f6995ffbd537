#!/bin/bash
# Time to first training step from a cached quantized base with a warm kernel cache (issue 5's last target):
# write a random 7B checkpoint in HF format, train once (loads, quantizes, caches the base), then time a
# second process, which reads the cached base.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
CKPT=/tmp/ckpt7b
[ -f $CKPT/model.safetensors.index.json ] || python3 -m benchmarks.make_checkpoint --preset 7b --out $CKPT \
  --no-progress 2>>"$OUT/log.txt"
for run in quantize-and-cache cached; do
  echo "== $run" | tee -a "$OUT/log.txt"
  bench 300 --stack ours --batch 4 --seq 512 --checkpointing --steps 1 --warmup 1 model=mistral-7b \
    model.path=$CKPT paths.cache=/tmp/qcache
done
save_kernel_cache
