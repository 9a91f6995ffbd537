#!/bin/bash
# The 7B-shape GPU benchmarks of BENCHMARKS.md, for one call on a lent NVIDIA machine (after setup_mlx_cuda.sh).
# Each stack runs in its own process (harness.bench --stack) so an interrupted call still keeps what finished.
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
[ -f .ptx/mlx_ptx_cache.tgz ] && mkdir -p /root && tar xzf .ptx/mlx_ptx_cache.tgz -C /root
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
run() {  # run SECONDS ARGS...: one stack, its RESULT line appended to results.jsonl
  local limit=$1; shift
  echo "== $*" | tee -a "$OUT/log.txt"
  timeout "$limit" python3 -m harness.bench model=mistral-7b-shape "$@" 2>>"$OUT/log.txt" \
    | grep '^RESULT ' | sed 's/^RESULT //' | tee -a "$OUT/results.jsonl"
}
run 200 --stack ours --batch 8 --seq 512
run 100 --stack ours --batch 4 --seq 512 --checkpointing
run 150 --stack mlx-lm --batch 8 --seq 512
run 50 --stack ours --batch 4 --seq 512 --checkpointing --steps 1 --warmup 1  # time to first step, warm kernels
[ "${MLX_LM_CHECKPOINTING:-0}" = 1 ] && run 120 --stack mlx-lm --batch 4 --seq 512 --checkpointing
tar czf "$OUT/mlx_ptx_cache.tgz" -C /root mlx_ptx 2>/dev/null
tail -5 "$OUT/log.txt"
