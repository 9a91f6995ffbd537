#!/bin/bash
# Our 7B-shape GPU benchmarks beside mlx-lm, for one call on a lent NVIDIA machine (after setup_mlx_cuda.sh);
# run_anchors.sh adds PyTorch + PEFT (+ bitsandbytes) on the same machine. Each stack runs in its own process
# (harness.bench --stack) so an interrupted call still keeps what finished.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
bench 150 --stack ours --batch 8 --seq 512 --steps 10
bench 150 --stack ours --batch 4 --seq 512 --checkpointing --steps 10
bench 200 --stack mlx-lm --batch 8 --seq 512 --steps 5
bench 150 --stack ours --batch 8 --seq 512 --steps 10   # again, after mlx-lm: run-to-run spread
save_kernel_cache
