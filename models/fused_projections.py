"""Projections that read the same input, computed as one product each: swapped into a model from outside.

q, k and v read the same normed hidden state, and so do gate and up. `fused_projections` computes such a group's
base outputs as one product on one dense weight (`models.quant.concatenated_product`) and, when none of their
adapters drops, the adapters' down projections as one product with the A matrices stacked; each adapter's up
projection (B) is then added to its own part of the output. The parameters stay where they are, under Hugging
Face's names (adapters, exports and checkpoints do not change): only the computation does.

Why: a small training step is bound by the number of kernels it launches, not by arithmetic (BENCHMARKS.md,
"Where a small step's time goes"), and larger products use a BLAS or GEMM better. A layer's five input projections
take two dequantizations and two products instead of five each, and two adapter down projections instead of five.
Groups that cannot be fused (another forward path at this token count, mixed schemes, biases, dense weights) are
computed one projection at a time, as before.
"""

from __future__ import annotations

import itertools

import mlx.core as mx
from mlx import nn

from models.lora import LoRALinear
from models.mistral import separate_projections
from models.quant import concatenated_product


def _split_points(sizes: list[int]) -> list[int]:
    """Where to split an axis made of parts of `sizes` (`mx.split`'s indices)."""
    return list(itertools.accumulate(sizes))[:-1]


def fused_projections(projections: tuple[nn.Module, ...], x: mx.array) -> list[mx.array]:
    """Each of `projections` (linears, plain, quantized or adapted, that all read `x`) applied to `x`, computed as
    one product where they allow it (module docstring); the same outputs as `separate_projections`."""
    bases = tuple(p.base_layer if isinstance(p, LoRALinear) else p for p in projections)
    stacked = concatenated_product(bases, x)
    if stacked is None:
        return separate_projections(projections, x)
    outputs = mx.split(stacked, _split_points([base.out_features for base in bases]), axis=-1)
    adapters = [p for p in projections if isinstance(p, LoRALinear)]
    downs: list[mx.array | None] = [None] * len(projections)
    if len(adapters) == len(projections) and not any(a.drops for a in adapters):
        # Without dropout every adapter's down projection reads the same x: one product for all of them.
        # (With dropout each adapter draws its own mask over x, so each projects its own dropped copy.)
        a = mx.concatenate([p.lora_A for p in projections], axis=0).astype(x.dtype)
        downs = mx.split(x @ a.T, _split_points([p.rank for p in projections]), axis=-1)
    return [
        p.add_update(y, x, down) if isinstance(p, LoRALinear) else y
        for p, y, down in zip(projections, outputs, downs)
    ]


def fuse_projections(model: nn.Module) -> int:
    """Give every decoder layer's attention (q/k/v) and MLP (gate/up) `fused_projections`; returns how many
    blocks were changed. `unfuse_projections` undoes it."""
    return _set_projections_fn(model, fused_projections)


def unfuse_projections(model: nn.Module) -> int:
    """Back to one product per projection (`models.mistral.separate_projections`); returns how many blocks."""
    return _set_projections_fn(model, separate_projections)


def _set_projections_fn(model: nn.Module, fn) -> int:
    changed = 0
    for layer in model.model.layers:
        for block in (layer.self_attn, layer.mlp):
            changed += block.projections_fn is not fn
            block.projections_fn = fn
    return changed


__all__ = ["fuse_projections", "fused_projections", "unfuse_projections"]
