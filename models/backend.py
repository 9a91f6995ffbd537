"""The one place that answers per-backend questions: which backend runs (`backend_name`, `is_cpu`), the compute
dtype, and the facts logged with every run. Other modules ask here rather than comparing devices themselves."""

from __future__ import annotations

import os

import mlx.core as mx

from models import blas, malloc

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def backend_name() -> str:
    """'metal', 'cuda' or 'cpu': where MLX runs by default."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda"


def is_cpu() -> bool:
    """Whether MLX runs on the CPU by default (where `exp` is a scalar loop and only float32 reaches the BLAS)."""
    return backend_name() == "cpu"


def compute_dtype(name: str | None = "auto") -> mx.Dtype:
    """The dtype activations and dequantized weights use.

    "auto" gives bfloat16 on a GPU (Metal, CUDA) and float32 on the CPU, where only float32 matmuls
    reach BLAS (bfloat16 runs many times slower there).
    """
    if name in (None, "auto"):
        return mx.float32 if is_cpu() else mx.bfloat16
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(_DTYPES)}") from None


def dtype_name(dtype: mx.Dtype) -> str:
    return next(name for name, value in _DTYPES.items() if value == dtype)


def describe() -> dict[str, str | int | None]:
    """Backend facts worth logging with every run."""
    return {
        "mlx": mx.__version__,
        "backend": backend_name(),
        "device": str(mx.default_device()),
        "blas": blas.loaded_blas,
        "malloc": "tuned" if malloc.tuned else "default",
        "blas_threads": blas.blas_threads(),
        "eval_order_width": os.environ.get("MLX_BFS_MAX_WIDTH"),
    }
