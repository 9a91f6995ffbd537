#!/bin/bash
# The flagship experiment as shipped (experiment=mistral7b_dolly_qlora: 4 x 512 x 4 accumulation, r=16, dropout
# 0.05, checkpointing, memory limit 8 GB), ours only, 7B shape: its speed and peak after a change to the
# checkpointed step (run_flagship.sh adds the PyTorch anchor). Writes $OUT/results.jsonl and $OUT/table.txt.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
bench 150 --stack ours experiment=mistral7b_dolly_qlora --steps 4 --warmup 1
results_table
