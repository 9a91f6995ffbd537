"""Swap the CPU-friendly activation and attention into a model, from outside, where `exp` is slow.

MLX's CPU backend computes `exp` (hence `sigmoid`, SiLU and the softmax inside
`mx.fast.scaled_dot_product_attention`) as a scalar loop. `use_cpu_paths` gives every decoder layer the
versions built on `models.cross_entropy.polynomial_exp`: `PolynomialSiLU` as the MLP's `act_fn` and
`polynomial_attention` as the attention's `attention_fn`. On GPUs it changes nothing.
"""

from __future__ import annotations

from mlx import nn

from models.activations import PolynomialSiLU
from models.attention import fused_attention, polynomial_attention
from models.cross_entropy import default_exp


def use_cpu_paths(model: nn.Module, backend_exp: str | None = None) -> int:
    """Where `exp` is slow (`default_exp()` is "polynomial", i.e. the CPU), swap in the polynomial SiLU and
    attention; elsewhere leave the model alone. Returns how many decoder layers were changed."""
    if (backend_exp or default_exp()) != "polynomial":
        return 0
    changed = 0
    for layer in model.model.layers:
        swapped = False
        if isinstance(layer.mlp.act_fn, nn.SiLU):
            layer.mlp.act_fn = PolynomialSiLU()
            swapped = True
        if layer.self_attn.attention_fn is fused_attention:
            layer.self_attn.attention_fn = polynomial_attention
            swapped = True
        changed += swapped
    return changed


__all__ = ["use_cpu_paths"]
