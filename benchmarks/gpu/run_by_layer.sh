#!/bin/bash
# Issue 12, session 12, one call: the whole-graph step's work queued a layer at a time (`ab_step.py --compare
# by-layer`: MLX walks a whole graph before encoding its first kernel), 8 x 512 in two processes, then 4 x 128.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
ab --compare by-layer --rows 8 --seq 512 --tag _8x512_a model=mistral-7b-shape
ab --compare by-layer --rows 8 --seq 512 --tag _8x512_b model=mistral-7b-shape
ab --compare by-layer --rows 4 --seq 128 --tag _4x128 model=mistral-7b-shape trainer.train_step=standard
