#!/bin/bash
# Issue 12, session 11, one call, 7B shape. (1) What a timed step evaluates: the training loop evaluates the loss,
# token count and norm only (harness.loop), so the update's new parameters are computed as the next step's graph
# reaches them; the benchmarks also evaluated the parameters and the optimizer's state, which ends every step on
# the update's small kernels. (2) The whole-graph step's squared norms computed with the gradients, in the
# backward pass's order, so that they follow each layer's backward pass instead of all coming at the end.
# ab_step.py (variants in one process) and kernel_trace.py at 8 x 512; eval sets at 4 x 128 too. JSON under $OUT.
OUT=${OUT:-/tmp/bench_out}
source "$(dirname "$0")/common.sh"
BUDGET=${BUDGET:-570}
trace() {
  [ "$SECONDS" -lt $((BUDGET - 70)) ] || { echo "== skipped (time): kernel_trace $*"; return; }
  echo "== kernel_trace $*" | tee -a "$OUT/log.txt"
  timeout 120 python3 benchmarks/gpu/kernel_trace.py --top 8 "$@" 2>>"$OUT/log.txt" | grep -v Warning
}
AB_TIMEOUT=120 ab --compare eval-set --tag _8x512 --rows 8 --seq 512 --rounds 2 model=mistral-7b-shape
AB_TIMEOUT=170 ab --compare norm-place --tag _8x512_loop --eval-set loop --rows 8 --seq 512 --rounds 2 model=mistral-7b-shape
trace --tag _8x512_loop --eval-set loop
trace --tag _8x512_loop_gradients_in_place --eval-set loop --compare norm-place --variant gradients/in-place
[ "$SECONDS" -lt $((BUDGET - 100)) ] && AB_TIMEOUT=100 ab --compare eval-set --tag _4x128 --rounds 3 model=mistral-7b-shape
echo "elapsed $SECONDS s"
