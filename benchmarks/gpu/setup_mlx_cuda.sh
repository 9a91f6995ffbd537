#!/bin/bash
# Install MLX + its CUDA backend (and the small pure-Python wheels harness.bench needs) into /tmp/site on an
# offline NVIDIA machine whose Python already has torch's CUDA libraries (see BENCHMARKS.md, "GPU runs").
#   source benchmarks/gpu/setup_mlx_cuda.sh WHEELS_DIR [PART_DIR...]
# The 90 MB mlx-cuda wheel may arrive split (`split -b 45M`): its parts are joined and checked first.
W=${1:?wheels dir}
shift
WHEEL=mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
SHA=94cb48fba73e5ee39467e51c35c51c691123359ca17bafd1a24cf92ad6732bee
if ! PYTHONPATH=/tmp/site python3 -c "import mlx.core" 2>/dev/null; then
  if [ ! -f "/tmp/$WHEEL" ]; then
    cat $(ls "$@" 2>/dev/null | sort) > "/tmp/$WHEEL"
  fi
  echo "$SHA  /tmp/$WHEEL" | sha256sum -c - || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "/tmp/$WHEEL" "$W"/mlx-0.32.4-*.whl
  ln -sfn /opt/torch/.venv/lib/python3.12/site-packages/nvidia /tmp/site/nvidia
fi
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
  $(ls "$W"/*.whl | grep -v -e '/mlx-0' -e bitsandbytes)
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export MLX_PTX_CACHE_DIR=${MLX_PTX_CACHE_DIR:-/root/mlx_ptx}
python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device(), "cuda", mx.cuda.is_available())'
