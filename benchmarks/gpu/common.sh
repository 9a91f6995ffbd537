# Shared by the GPU run scripts: restore MLX's kernel cache, name the card, run one harness.bench stack or the
# PyTorch anchor (PEFT on bitsandbytes from /tmp/bnb_site).
mkdir -p "$OUT"
[ -f .ptx/mlx_ptx_cache.tgz ] && [ ! -d /root/mlx_ptx ] && mkdir -p /root && tar xzf .ptx/mlx_ptx_cache.tgz -C /root
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
bench() {  # bench SECONDS ARGS...: one stack in its own process, its RESULT line appended to results.jsonl
  local limit=$1; shift
  echo "== $*" | tee -a "$OUT/log.txt"
  timeout "$limit" python3 -m harness.bench model=${MODEL:-mistral-7b-shape} "$@" 2>>"$OUT/log.txt" \
    | grep '^RESULT ' | sed 's/^RESULT //' | tee -a "$OUT/results.jsonl"
}
ab() {  # ab ARGS...: one benchmarks/ab_step.py comparison in its own process (at most AB_TIMEOUT seconds, 150)
  echo "== ab_step $*" | tee -a "$OUT/log.txt"
  timeout "${AB_TIMEOUT:-150}" python3 benchmarks/ab_step.py "$@" 2>>"$OUT/log.txt" | grep -v Warning
}
setting_env() {  # setting_env SETTING: "default" -> nothing; "A=1,B=2" -> "A=1 B=2", for `env $(setting_env ...)`
  [ "$1" = default ] || echo "$1" | tr , ' '
}
tagged() {  # tagged SETTING ROUND: RESULT lines in, their JSON out with the setting and round added
  grep '^RESULT ' | sed 's/^RESULT //' | python3 -c "import json,sys; [print(json.dumps({**json.loads(l), 'setting': '$1', 'round': $2})) for l in sys.stdin]"
}
torch_run() {  # torch_run SECONDS ARGS...: one run of benchmarks/torch_qlora.py, its JSON line to torch.jsonl
  local limit=$1; shift
  echo "== torch $*" | tee -a "$OUT/log.txt"
  PYTHONPATH=/tmp/bnb_site timeout "$limit" python3 benchmarks/torch_qlora.py "$@" 2>>"$OUT/log.txt" \
    | grep '^{' | tee -a "$OUT/torch.jsonl"
}
torch_flagship() {  # torch_flagship SECONDS: the anchor on the flagship experiment's settings
  torch_run "$1" --base nf4 --batch 4 --seq 512 --rank 16 --dropout 0.05 --accum 4 --checkpointing --steps 3
}
results_table() {  # the harness.bench table of $OUT/results.jsonl, printed and written to $OUT/table.txt
  python3 - "$OUT/results.jsonl" <<'PY' | tee "$OUT/table.txt"
import json, sys
from harness.bench import print_table
print_table([json.loads(line) for line in open(sys.argv[1]) if line.strip()])
PY
}
save_kernel_cache() {  # bring MLX's compiled kernels back for the next machine (carry .ptx/ in later calls)
  tar czf "$OUT/mlx_ptx_cache.tgz" -C /root mlx_ptx 2>/dev/null
}
