#!/bin/bash
# Issue 12, session 10, one call: MLX's CUDA graph size against the 8 x 512 step. MLX launches a CUDA graph every
# MLX_MAX_OPS_PER_BUFFER kernels (default 20) or MLX_MAX_MB_PER_BUFFER megabytes of outputs, and the host may be at
# most 10 launched graphs ahead of the GPU (MAX_ACTIVE_TASKS in MLX's transforms.cpp): where the host takes longer
# to encode a kernel than the GPU to run it, the GPU waits. harness.bench 8 x 512 once per setting and process,
# settings alternating over ROUNDS rounds; then the kernel trace (GPU busy beside wall time, idle gaps) under the
# default and under SETTING_TRACE (TRACE_ARGS: kernel_trace.py's own options; TRACE=0 skips it). Settings may name
# any of MLX's environment variables, e.g. MLX_CUDA_GRAPH_CACHE_SIZE. JSON and logs under $OUT.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
ROUNDS=${ROUNDS:-2}
SETTINGS=${SETTINGS:-"default MLX_MAX_MB_PER_BUFFER=100000 MLX_MAX_OPS_PER_BUFFER=100,MLX_MAX_MB_PER_BUFFER=100000 MLX_MAX_OPS_PER_BUFFER=100"}
SHAPE=${SHAPE:-"--batch 8 --seq 512"}
for round in $(seq "$ROUNDS"); do
  for setting in $SETTINGS; do
    echo "== round $round $setting $SHAPE" | tee -a "$OUT/log.txt"
    env $(setting_env "$setting") timeout 120 python3 -m harness.bench \
      model=${MODEL:-mistral-7b-shape} --stack ours $SHAPE --steps 5 2>>"$OUT/log.txt" \
      | tagged "$setting" "$round" | tee -a "$OUT/buffer_settings.jsonl" | python3 -c "import json,sys; [print(round(json.loads(l)['tokens_per_second']), 'tok/s', round(json.loads(l)['peak_memory_gb'],2), 'GB') for l in sys.stdin]"
  done
done
# the MLX_ variables this MLX build reads (names in its libraries)
find /tmp/site -name 'libmlx*.so*' 2>/dev/null | head -3 | xargs -r strings 2>/dev/null | grep -o '^MLX_[A-Z_]*$' | sort -u | tr '\n' ' ' | tee -a "$OUT/log.txt"; echo
[ "${TRACE:-1}" = 1 ] || exit 0
for setting in default ${SETTING_TRACE:-MLX_MAX_OPS_PER_BUFFER=100,MLX_MAX_MB_PER_BUFFER=100000}; do
  echo "== kernel_trace $setting" | tee -a "$OUT/log.txt"
  env $(setting_env "$setting") timeout 120 python3 benchmarks/gpu/kernel_trace.py \
    --tag "_$(echo "$setting" | tr ',=' '__')" $TRACE_ARGS 2>>"$OUT/log.txt" | grep -v Warning | head -28
done
