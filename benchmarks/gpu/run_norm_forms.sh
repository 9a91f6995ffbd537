#!/bin/bash
# Issue 12, next: the whole-graph step's update copies every adapter gradient, which autograd leaves laid out by
# columns, to rows before its dot product (`reshape(-1)` in harness.step.accumulate.squared_norm): 448 copies a step,
# during which the GPU waited 11.8 ms at 8 x 512 (BENCHMARKS.md, "Session 10"). The four forms of
# `ab_step.py --compare norm`, one process per setting, ROUNDS rounds: 8 x 512 and 4 x 128 (whole-graph step).
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
AB_TIMEOUT=240
ab --compare norm --tag _8x512 --rows 8 --seq 512 --rounds "${ROUNDS:-3}" model=mistral-7b-shape
ab --compare norm --tag _4x128_standard --rounds "${ROUNDS:-3}" model=mistral-7b-shape trainer.train_step=standard
