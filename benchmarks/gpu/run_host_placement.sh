#!/bin/bash
# Issue 12: why one process of our 4 x 128 step runs at ~81 ms and the next at ~115 ms (the same command, one
# call). Prints the host's NUMA layout and the GPU's local CPUs, then runs ours (harness.bench, 7B shape,
# 4 x 128) ROUNDS times (default 2) in each of these ways, alternating: as is, pinned to the GPU's local CPUs
# (taskset) or to each CPU list in PINS (e.g. PINS="2-3 2-5"), and with a fixed PYTHONHASHSEED (unless
# HASHSEED=0). Writes $OUT/results.jsonl and the table $OUT/table.txt.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
lscpu | grep -iE "^CPU\(s\)|NUMA|Thread|Socket|Model name" | tee "$OUT/host.txt"
BUS=$(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader | head -1 | cut -c5- | tr 'A-F' 'a-f')
LOCAL=$(cat "/sys/bus/pci/devices/$BUS/local_cpulist" 2>/dev/null || echo 0-7)
echo "GPU $BUS local CPUs: $LOCAL" | tee -a "$OUT/host.txt"
nvidia-smi topo -m 2>/dev/null | tee -a "$OUT/host.txt"
for round in $(seq "${ROUNDS:-2}"); do
  echo "== next row: as is" | tee -a "$OUT/log.txt"; bench 45 --stack ours --batch 4 --seq 128 --steps 10
  for cpus in ${PINS:-$LOCAL}; do
    echo "== next row: taskset -c $cpus" | tee -a "$OUT/log.txt"
    taskset -p -c "$cpus" $$ >/dev/null  # this shell, so the bench process, on these CPUs
    bench 45 --stack ours --batch 4 --seq 128 --steps 10
    taskset -p -c "0-$(($(nproc --all) - 1))" $$ >/dev/null
  done
  if [ "${HASHSEED:-1}" != 0 ]; then
    echo "== next row: PYTHONHASHSEED=0" | tee -a "$OUT/log.txt"
    PYTHONHASHSEED=0 bench 45 --stack ours --batch 4 --seq 128 --steps 10
  fi
done
results_table
