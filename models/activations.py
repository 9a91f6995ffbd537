"""The MLP's activation: SiLU, and the gated product `silu(gate) * up` with a backward pass of its own.

Differentiated by MLX, `silu(gate) * up` stores `silu(gate)` for the backward pass, and SiLU's own backward pass
what it needs of `sigmoid(gate)`, beside `gate` and `up`. `SiLU.gated` computes the product in one pass (float32
inside, fused by a compiled graph into one kernel) and recomputes the sigmoid in its backward pass, so it stores
only `gate` and `up`: on the CPU 1.1 arrays of the MLP's width per layer fewer (BENCHMARKS.md, "Session 13").

MLX's CPU backend computes `sigmoid` (hence SiLU) as a scalar loop; `PolynomialSiLU`, built on `polynomial_exp`
from vectorizable arithmetic and given a hand-written backward, is several times faster (BENCHMARKS.md, "Why
the code is as it is"). `models.cpu_paths` swaps it in on the CPU; GPUs keep `SiLU`.
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


def _silu_gate(sigmoid):
    """`(gate, up) -> silu(gate) * up`, computed in float32 with `sigmoid` and returned in the inputs' dtype
    (float32 where they differ); its backward pass recomputes `sigmoid(gate)` instead of keeping it."""

    @mx.custom_function
    def silu_gate(gate: mx.array, up: mx.array) -> mx.array:
        dtype = gate.dtype if gate.dtype == up.dtype else mx.float32
        g = gate.astype(mx.float32)
        return (g * sigmoid(g) * up.astype(mx.float32)).astype(dtype)

    @silu_gate.vjp
    def silu_gate_vjp(primals, cotangent, output):
        gate, up = primals
        g, u, c = gate.astype(mx.float32), up.astype(mx.float32), cotangent.astype(mx.float32)
        s = sigmoid(g)
        grad_gate = c * u * s * (1 + g * (1 - s))
        return grad_gate.astype(gate.dtype), (c * g * s).astype(up.dtype)

    return silu_gate


silu_gate = _silu_gate(mx.sigmoid)
polynomial_silu_gate = _silu_gate(_sigmoid)


class SiLU(nn.SiLU):
    """`nn.SiLU`, with `gated(gate, up)`: `silu(gate) * up` keeping only `gate` and `up` for the backward pass."""

    def gated(self, gate: mx.array, up: mx.array) -> mx.array:
        return silu_gate(gate, up)


class PolynomialSiLU(nn.Module):
    """`SiLU` with `polynomial_silu`: the same function to float32 rounding, several times faster on the CPU."""

    def __call__(self, x: mx.array) -> mx.array:
        return polynomial_silu(x)

    def gated(self, gate: mx.array, up: mx.array) -> mx.array:
        return polynomial_silu_gate(gate, up)
