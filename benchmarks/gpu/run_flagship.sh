#!/bin/bash
# The flagship experiment as shipped, `experiment=mistral7b_dolly_qlora model=mistral-7b-shape` (row-wise 4-bit,
# LoRA r=16 with dropout 0.05, 4 x 512, 4 micro-batches per optimizer step, gradient checkpointing; random 7B
# weights), beside PyTorch + PEFT + bitsandbytes NF4 on the same settings, in one call on a lent NVIDIA machine:
#   source benchmarks/gpu/setup_mlx_cuda.sh WHEELS PARTS... && bash benchmarks/gpu/run_flagship.sh
# bitsandbytes must sit in /tmp/bnb_site (as for run_anchors.sh). Both sides time whole optimizer steps (all
# four micro-batches) and report the peak over them. Writes $OUT/flagship.md (the table), results.jsonl
# (harness.bench), torch.jsonl, log.txt.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
# Batch, sequence, accumulation, rank and dropout all come from the experiment's config.
bench 330 --stack ours experiment=mistral7b_dolly_qlora --steps 4 --warmup 1
torch_flagship 220
save_kernel_cache
python3 - "$OUT" <<'PY' | tee "$OUT/flagship.md"
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks/gpu")
from run_records import rows
out = Path(sys.argv[1])
ours = [r for r in rows(out, "results.jsonl") if r.get("stack") == "ours" and r.get("grad_accum_steps") == 4]
torch = [r for r in rows(out, "torch.jsonl") if r.get("grad_accum_steps") == 4]
gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "?"
print(f"GPU: {gpu}\n")
print("| stack | step | batch x seq x accum | rank | dropout | ckpt | tok/s | s/optimizer step | peak GiB |")
print("|---|---|---|---|---|---|---|---|---|")
for r in ours[-1:]:
    print(f"| ours (MLX) | {r['train_step']} | {r['batch']} x {r['seq']} x {r['grad_accum_steps']} | {r['lora_rank']} | "
          f"{r['lora_dropout']} | {r['checkpointing']} | {r['tokens_per_second']:,.0f} | {r['step_seconds']:.2f} | "
          f"{r['peak_memory_gb'] * 1e9 / 2**30:.2f} |")
for r in torch[-1:]:
    print(f"| {r['stack']} | - | {r['batch']} x {r['seq']} x {r['grad_accum_steps']} | {r['lora_rank']} | "
          f"{r['lora_dropout']} | {r['checkpointing']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.2f} | "
          f"{r['peak_gib']:.2f} |")
if ours and torch:
    print(f"\nours / torch: {ours[-1]['tokens_per_second'] / torch[-1]['tokens_per_s']:.2f}x tokens/s "
          f"(target >= 2x); ours peak {ours[-1]['peak_memory_gb'] * 1e9 / 2**30:.2f} GiB (target <= 8 GiB)")
PY
