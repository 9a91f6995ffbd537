#!/bin/bash
# Issue 12, sessions 11-12: the rotary kernel's peak at 8 x 512 (whole-graph step, 7B shape) beside MLX's rope:
# ab_step.py --compare rope.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
AB_TIMEOUT=170 ab --compare rope --tag _8x512_memory --rows 8 --seq 512 --rounds 2 model=mistral-7b-shape
