#!/bin/bash
# Issue 12, for session 13, one call: where queuing the whole-graph step in pieces costs its 4.5-4.8 GB at 8 x 512
# (`ab_step.py --compare by-layer-memory`: the layer outputs alone, the gradients in two pieces, in groups of 8
# layers, layer by layer; BENCHMARKS.md, "Session 12"), then the same at 4 x 128 with the whole-graph step.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
AB_TIMEOUT=200 ab --compare by-layer-memory --rows 8 --seq 512 --rounds 2 --tag _8x512 model=mistral-7b-shape
AB_TIMEOUT=120 ab --compare by-layer-memory --rows 4 --seq 128 --rounds 2 --tag _4x128 model=mistral-7b-shape \
  trainer.train_step=standard
