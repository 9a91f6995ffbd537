#!/bin/bash
# What bounds the flagship experiment's peak (issue 16), in one call on a lent NVIDIA machine: the experiment as
# shipped (`experiment=mistral7b_dolly_qlora model=mistral-7b-shape`: row-wise 4-bit, LoRA r=16 with dropout
# 0.05, 4 x 512 x 4 micro-batches, checkpointing; random 7B weights), then with MLX's memory limit
# (`trainer.memory_limit_gb`, which makes MLX wait for queued work before going past it) and with the embedding
# and LM head quantized too, then PyTorch + PEFT + bitsandbytes NF4 on the same settings (the speed anchor).
#   source benchmarks/gpu/setup_mlx_cuda.sh WHEELS PARTS... && bash benchmarks/gpu/run_flagship_memory.sh
# bitsandbytes must sit in /tmp/bnb_site (NOTES.md). Writes $OUT/results.jsonl, torch.jsonl, log.txt and the
# table $OUT/flagship_memory.md. LIMIT: seconds per variant. Dry run on a CPU:
#   MODEL=tiny LIMIT=200 TORCH_LIMIT=1 bash benchmarks/gpu/run_flagship_memory.sh
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
QUANTIZED_ENDS="quant.quantize_embeddings=true quant.quantize_lm_head=true"
VARIANTS=(
  ""
  "trainer.memory_limit_gb=8.0"
  "$QUANTIZED_ENDS"
  "$QUANTIZED_ENDS trainer.memory_limit_gb=7.5"
)
touch "$OUT/results.jsonl"
for variant in "${VARIANTS[@]}"; do
  before=$(wc -l <"$OUT/results.jsonl")
  bench ${LIMIT:-100} --stack ours experiment=mistral7b_dolly_qlora --steps 4 --warmup 1 $variant >/dev/null
  [ "$(wc -l <"$OUT/results.jsonl")" -gt "$before" ] && echo "$variant" >>"$OUT/variants.txt"
done
torch_flagship ${TORCH_LIMIT:-200}
save_kernel_cache
python3 - "$OUT" <<'PY' | tee "$OUT/flagship_memory.md"
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks/gpu")
from run_records import rows
out = Path(sys.argv[1])
ours, torch = rows(out, "results.jsonl"), rows(out, "torch.jsonl")
names = (out / "variants.txt").read_text().splitlines() if (out / "variants.txt").exists() else []
anchor = torch[-1]["tokens_per_s"] if torch else float("nan")
print("| variant | tok/s | x bitsandbytes | peak GB | peak GiB |\n|---|---|---|---|---|")
for name, r in zip(names, ours):
    print(f"| {name or 'as shipped'} | {r['tokens_per_second']:,.0f} | {r['tokens_per_second'] / anchor:.2f}x | "
          f"{r['peak_memory_gb']:.2f} | {r['peak_memory_gb'] * 1e9 / 2**30:.2f} |")
for r in torch[-1:]:
    print(f"| PyTorch + PEFT + bitsandbytes NF4 | {r['tokens_per_s']:,.0f} | 1.00x | | {r['peak_gib']:.2f} |")
PY
