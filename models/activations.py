"""Activation functions for backends where MLX's own are slow, swapped into a model from outside.

MLX's CPU backend computes `sigmoid` (hence SiLU) as a scalar loop; the version here, built on `polynomial_exp`
from vectorizable arithmetic and given a hand-written backward, is several times faster (BENCHMARKS.md, "Why
the code is as it is").
`models.cpu_paths` swaps it in on the CPU; GPUs keep `nn.SiLU`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from models.cross_entropy import polynomial_exp


def _sigmoid(x: mx.array) -> mx.array:
    # exp(-x) is clamped below float32 overflow: for x < -87 the sigmoid is ~1e-38 either way.
    return 1.0 / (1.0 + polynomial_exp(mx.minimum(-x.astype(mx.float32), 87.0)))


@mx.custom_function
def polynomial_silu(x: mx.array) -> mx.array:
    """`x * sigmoid(x)` in x's dtype, computed in float32 (relative error about 1e-6)."""
    return (x.astype(mx.float32) * _sigmoid(x)).astype(x.dtype)


@polynomial_silu.vjp
def _polynomial_silu_vjp(x, cotangent, output):  # one argument: MLX passes the array itself, not a tuple
    s = _sigmoid(x)
    return (cotangent.astype(mx.float32) * s * (1 + x.astype(mx.float32) * (1 - s))).astype(x.dtype)


class PolynomialSiLU(nn.Module):
    """`nn.SiLU` with `polynomial_silu`: the same function to float32 rounding, several times faster on the CPU."""

    def __call__(self, x: mx.array) -> mx.array:
        return polynomial_silu(x)
