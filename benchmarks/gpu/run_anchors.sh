#!/bin/bash
# The PyTorch anchors beside ours (run_7b.sh) on the same machine: PEFT LoRA on a bitsandbytes NF4 or bf16 base.
# Needs bitsandbytes importable (a wheel installed into /tmp/bnb_site, see NOTES.md); torch, transformers and
# peft come with the machine's Python.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
torch_run 150 --base nf4 --batch 8 --seq 512
torch_run 150 --base nf4 --batch 4 --seq 512 --checkpointing
torch_run 120 --base bf16 --batch 8 --seq 512
save_kernel_cache
