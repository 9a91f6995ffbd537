#!/bin/bash
# Data-parallel scaling on one host, in one call: the 7B-shape QLoRA step at 8 x 512 rows per GPU on one GPU,
# then on two GPUs (harness.launch, NCCL: each rank 8 rows of a 16-row global batch, gradients summed over
# ranks), then the table with the scaling efficiency (two GPUs' tokens/s / twice one GPU's):
#   source benchmarks/gpu/setup_mlx_cuda.sh WHEELS_DIR [PARTS...] && bash benchmarks/gpu/run_distributed.sh
# Writes $OUT/distributed.jsonl (one harness.bench result per line), $OUT/distributed_table.txt and the log.
# Dry run on a CPU: MODEL=tiny BACKEND=ring BATCH=4 SEQ=64 STEPS=3 bash benchmarks/gpu/run_distributed.sh
OUT=${OUT:-/tmp/bench_out}
# NVLink multicast stays off on the lent machines (a program using it can take the shared GPUs out of service):
# set here as well as in the machine's environment, and passed to every rank explicitly.
export NCCL_NVLS_ENABLE=0
source "$(dirname "$0")/common.sh"
MODEL=${MODEL:-mistral-7b-shape}
BACKEND=${BACKEND:-nccl}
ARGS=(model=$MODEL --stack ours --batch ${BATCH:-8} --seq ${SEQ:-512} --accum 1 --steps ${STEPS:-10})
result() { grep '^RESULT ' | sed 's/^RESULT //' | tee -a "$OUT/distributed.jsonl"; }
# One GPU first: it also compiles the step's kernels into the cache the two ranks then share.
echo "== 1 rank" | tee -a "$OUT/log.txt"
CUDA_VISIBLE_DEVICES=0 timeout ${LIMIT_1:-240} python3 -m harness.bench "${ARGS[@]}" 2>>"$OUT/log.txt" | result
echo "== 2 ranks ($BACKEND)" | tee -a "$OUT/log.txt"
timeout ${LIMIT_2:-300} python3 -m harness.launch -n 2 --backend $BACKEND --env NCCL_NVLS_ENABLE=0 \
  -- -m harness.bench "${ARGS[@]}" \
  2>>"$OUT/log.txt" | result
python3 "$(dirname "$0")/scaling_table.py" "$OUT/distributed.jsonl" | tee "$OUT/distributed_table.txt"
save_kernel_cache
