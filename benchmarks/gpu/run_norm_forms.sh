#!/bin/bash
# Issue 12: the update's squared norms, four forms (`ab_step.py --compare norm`, one process per setting, ROUNDS
# rounds) at 8 x 512 and 4 x 128 (whole-graph step): a dot product of the flattened gradient (before session 11:
# autograd leaves the adapters' gradients laid out by columns, so flattening copied each), a sum of squares of it
# flattened, a square and a sum in the gradient's own layout (shipped since session 11), a dot product of its
# transpose (BENCHMARKS.md, "Session 11").
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
AB_TIMEOUT=240
ab --compare norm --tag _8x512 --rows 8 --seq 512 --rounds "${ROUNDS:-3}" model=mistral-7b-shape
ab --compare norm --tag _4x128_standard --rounds "${ROUNDS:-3}" model=mistral-7b-shape trainer.train_step=standard
