#!/bin/bash
# How MLX's CUDA backend batches kernels into CUDA graphs, against a small step's time (issue 12): the same
# harness.bench runs (7B shape, 4x128 with and without checkpointing) under MLX's CUDA environment settings,
# each in its own process (MLX reads them once), settings interleaved over ROUNDS rounds so a drift of the host's
# speed spreads over all of them. MLX_MAX_OPS_PER_BUFFER: kernels per CUDA graph before it is launched (MLX's
# default 20); MLX_USE_CUDA_GRAPHS=0: every kernel launched on its own. Writes $OUT/graph_settings.jsonl (each
# RESULT line with its setting) and the table $OUT/graph_settings.txt.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
ROUNDS=${ROUNDS:-2}
SETTINGS=${SETTINGS:-"default MLX_MAX_OPS_PER_BUFFER=60 MLX_MAX_OPS_PER_BUFFER=200 MLX_USE_CUDA_GRAPHS=0"}
for round in $(seq "$ROUNDS"); do
  for setting in $SETTINGS; do
    for args in "--batch 4 --seq 128" "--batch 4 --seq 128 --checkpointing"; do
      echo "== round $round $setting $args" | tee -a "$OUT/log.txt"
      env $(setting_env "$setting") timeout 60 python3 -m harness.bench \
        model=${MODEL:-mistral-7b-shape} --stack ours $args --steps 10 2>>"$OUT/log.txt" \
        | tagged "$setting" "$round" | tee -a "$OUT/graph_settings.jsonl"
    done
  done
done
python3 - "$OUT/graph_settings.jsonl" <<'PY' | tee "$OUT/graph_settings.txt"
import json, statistics, sys
from collections import defaultdict
runs = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs[(r["setting"], r["checkpointing"])].append(r)
print(f"| setting | checkpointing | tok/s by round | median | peak GB |\n|---|---|---|---|---|")
for (setting, ckpt), rs in runs.items():
    tps = [r["tokens_per_second"] for r in rs]
    print(f"| {setting} | {ckpt} | {', '.join(f'{t:,.0f}' for t in tps)} | {statistics.median(tps):,.0f} | "
          f"{max(r['peak_memory_gb'] for r in rs):.2f} |")
PY
