#!/bin/bash
# Issue 12, session 10, one call: (1) where the 8 x 512 step's time goes (large_step_profile.py, 7B shape);
# (2) why the 4 x 128 step is fast in some processes and slow in others: PROCESSES separate processes of
# `ab_step.py --compare threads --thread-cpu` (each thread's CPU time a step; the main thread alone on a CPU, all
# threads on one CPU, or free), with the host's CPU layout written first. JSON and logs under $OUT.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
{ nproc; grep -m1 'model name' /proc/cpuinfo; lscpu 2>/dev/null | grep -i -E 'thread|core|socket|numa'
  for c in /sys/devices/system/cpu/cpu[0-9]*; do echo "$(basename $c) siblings $(cat $c/topology/thread_siblings_list)"; done
  which nsys ncu 2>&1; } | tee "$OUT/host.txt"
echo "== large_step_profile" | tee -a "$OUT/log.txt"
timeout 240 python3 benchmarks/gpu/large_step_profile.py 2>>"$OUT/log.txt" | grep -v Warning
AB_TIMEOUT=120
for i in $(seq "${PROCESSES:-3}"); do
  ab --compare threads --thread-cpu --rounds 2 --tag "_$i" model=mistral-7b-shape
done
