#!/bin/bash
# Issue 12, session 10, one call: the next step built while the device runs the backward pass (harness.step.ahead:
# update queued after it) against in turn, at 8 x 512, under MLX's default CUDA graph size and under BIG (more
# kernels and megabytes per graph, so the host may run further ahead); the kernel trace under BIG; then BIG against
# the default in separate processes for the other targets' settings: 4 x 512 checkpointed under the memory limit
# (its peak) and 4 x 128 (`auto`), ROUNDS alternating rounds; last harness.bench 8 x 512 under BIG.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
BIG=${BIG:-"MLX_MAX_OPS_PER_BUFFER=100 MLX_MAX_MB_PER_BUFFER=100000"}
ab() { echo "== ab_step $*" | tee -a "$OUT/log.txt"; timeout 150 python3 benchmarks/ab_step.py "$@" 2>>"$OUT/log.txt" | grep -v Warning; }
ab --compare ahead --tag _8x512 --rows 8 --seq 512 --rounds 2 model=mistral-7b-shape
( export $BIG; ab --compare ahead --tag _8x512_big --rows 8 --seq 512 --rounds 2 model=mistral-7b-shape )
echo "== kernel_trace big" | tee -a "$OUT/log.txt"
env $BIG timeout 120 python3 benchmarks/gpu/kernel_trace.py --tag _8x512_big 2>>"$OUT/log.txt" | grep -v Warning | head -16
for round in $(seq "${ROUNDS:-2}"); do
  for setting in default big; do
    for args in "--batch 4 --seq 512 --checkpointing trainer.memory_limit_gb=8.0" "--batch 4 --seq 128"; do
      echo "== round $round $setting $args" | tee -a "$OUT/log.txt"
      env $( [ "$setting" = default ] || echo "$BIG" ) timeout 100 python3 -m harness.bench model=mistral-7b-shape \
        --stack ours $args --steps 8 2>>"$OUT/log.txt" | grep '^RESULT ' | sed 's/^RESULT //' \
        | python3 -c "import json,sys; [print(json.dumps({**json.loads(l), 'setting': '$setting', 'round': $round})) for l in sys.stdin]" \
        | tee -a "$OUT/graphs.jsonl" | python3 -c "import json,sys; [print(round(json.loads(l)['tokens_per_second']), 'tok/s', round(json.loads(l)['peak_memory_gb'],2), 'GB') for l in sys.stdin]"
    done
  done
done
echo "== bench 8x512 big" | tee -a "$OUT/log.txt"
env $BIG timeout 100 python3 -m harness.bench model=mistral-7b-shape --stack ours --batch 8 --seq 512 --steps 6 \
  2>>"$OUT/log.txt" | grep '^RESULT ' | tee -a "$OUT/results.jsonl"
