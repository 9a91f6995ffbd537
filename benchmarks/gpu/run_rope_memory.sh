#!/bin/bash
# Issue 12, session 11: where the rotary kernel's extra gigabyte at 8 x 512 comes from (whole-graph step, 7B shape):
# ab_step.py --compare rope with the kernel's forward pass alone (MLX's rope for the gradient) beside both ways.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
AB_TIMEOUT=170 ab --compare rope --tag _8x512_memory --rows 8 --seq 512 --rounds 2 model=mistral-7b-shape
