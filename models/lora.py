"""LoRA (Hu et al. 2021) applied from outside the model: wrap target linears, freeze everything else.

`LoRALinear` computes `y = base(x) + (alpha / r) * dropout(x) @ A^T @ B^T` over any base linear, quantized or
not. `A (r, in)` starts small and random (Kaiming-uniform, as PEFT does), `B (out, r)` starts at zero, so a
freshly wrapped model computes exactly what its base computes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from models.mistral import PROJECTIONS
from models.quant import QuantizedEmbedding, QuantizedLinear


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Which linears get adapters and how big they are.

    rank: r, the inner dimension of `B @ A`. alpha: the adapter output is scaled by `alpha / rank`.
    dropout: probability of zeroing inputs of the adapter branch (training only). target_modules: projection
    names inside each decoder layer. layers: indices of the decoder layers to adapt (negative counts from
    the end), or None for all.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = PROJECTIONS
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank={self.rank!r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout!r} must be in [0, 1)")
        unknown = set(self.target_modules) - set(PROJECTIONS)
        if unknown or not self.target_modules:
            raise ValueError(
                f"lora.target_modules={list(self.target_modules)} must be a non-empty subset of "
                f"{', '.join(PROJECTIONS)}"
            )
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def layer_indices(self, num_layers: int) -> list[int]:
        """Sorted non-negative indices of the adapted layers in a model of `num_layers` layers."""
        if self.layers is None:
            return list(range(num_layers))
        indices = set()
        for i in self.layers:
            if not -num_layers <= i < num_layers:
                raise ValueError(f"lora.layers has index {i}, but the model has {num_layers} layers")
            indices.add(i % num_layers)
        return sorted(indices)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["target_modules"] = list(self.target_modules)
        values["layers"] = None if self.layers is None else list(self.layers)
        return values


def _features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a plain or quantized linear."""
    if isinstance(layer, QuantizedLinear):
        return layer.in_features, layer.out_features
    out_features, in_features = layer.weight.shape
    return in_features, out_features


# Inside `dropout_keys(key)`: a one-element list holding the next key of the chain that adapter dropout draws from.
_DROPOUT_KEY_CHAIN: contextvars.ContextVar[list | None] = contextvars.ContextVar("lora_dropout_keys", default=None)


@contextlib.contextmanager
def dropout_keys(key: mx.array) -> Iterator[None]:
    """Adapter dropout inside this block draws its masks from `key` (`mx.random.key`, uint32 `(2,)`), not from
    MLX's global random state: the n-th adapter called takes the n-th key split off a chain started at `key`.
    Running the same layer again under the same key (a recomputation for the backward pass) therefore draws
    the same masks, and `key` may be an input of a compiled function."""
    token = _DROPOUT_KEY_CHAIN.set([key])
    try:
        yield
    finally:
        _DROPOUT_KEY_CHAIN.reset(token)


def _next_dropout_key() -> mx.array | None:
    chain = _DROPOUT_KEY_CHAIN.get()
    if chain is None:
        return None
    chain[0], key = mx.random.split(chain[0])
    return key


class LoRALinear(nn.Module):
    """`base_layer(x) + scale * dropout(x) @ lora_A^T @ lora_B^T`, with only `lora_A`/`lora_B` trainable.

    `lora_A (rank, in)` and `lora_B (out, rank)` are kept in float32 (optimizer precision) and cast to x's
    dtype for the forward pass, so the adapter branch runs in the compute dtype.
    """

    def __init__(self, base_layer: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        in_features, out_features = _features(base_layer)
        self.base_layer = base_layer
        self.base_layer.freeze()
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.dropout_p = dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        bound = 1.0 / math.sqrt(in_features)  # PEFT: kaiming_uniform_(a=sqrt(5)) on (r, in)
        self.lora_A = mx.random.uniform(-bound, bound, (rank, in_features))
        self.lora_B = mx.zeros((out_features, rank))

    def __call__(self, x: mx.array) -> mx.array:
        """`x (…, in) -> (…, out)` in x's dtype."""
        y = self.base_layer(x)
        h = self._dropped(x) if self.dropout is not None else x
        down = h @ self.lora_A.astype(x.dtype).T  # (…, rank)
        if y.dtype == x.dtype:
            # y + scale * down @ B^T in one GEMM (BLAS beta = 1): no separate pass over the (…, out) update.
            return mx.addmm(y, down, self.lora_B.astype(x.dtype).T, alpha=self.scale)
        update = down @ self.lora_B.astype(x.dtype).T
        return y + (self.scale * update).astype(y.dtype)

    def _dropped(self, x: mx.array) -> mx.array:
        """`nn.Dropout` on the adapter's input, with its mask from `dropout_keys` when one is active."""
        key = _next_dropout_key() if self.dropout.training else None
        if key is None:
            return self.dropout(x)
        keep = 1.0 - self.dropout_p
        return (mx.random.bernoulli(keep, x.shape, key=key) * x) * (1 / keep)

    def delta_weight(self, dtype=mx.float32) -> mx.array:
        """`scale * B @ A`, the `(out, in)` change this adapter makes to the base weight."""
        return (self.scale * (self.lora_B.astype(mx.float32) @ self.lora_A.astype(mx.float32))).astype(dtype)

    def merge(self, dtype=mx.float32) -> nn.Linear:
        """A plain `nn.Linear` with weight `base + scale * B @ A`, computed in float32, stored in `dtype`."""
        base = self.base_layer
        weight = base.dequantize(mx.float32) if isinstance(base, QuantizedLinear) else base.weight.astype(mx.float32)
        in_features, out_features = _features(base)
        has_bias = "bias" in base
        merged = nn.Linear(in_features, out_features, bias=has_bias)
        merged.weight = (weight + self.delta_weight(mx.float32)).astype(dtype)
        if has_bias:
            merged.bias = base.bias.astype(dtype)
        return merged


def lora_targets(model: nn.Module, spec: LoRASpec) -> list[tuple[str, nn.Module, str]]:
    """(dotted path, parent module, attribute) of every linear `spec` adapts."""
    layers = model.model.layers
    targets = []
    for i in spec.layer_indices(len(layers)):
        for block_name in ("self_attn", "mlp"):
            block = layers[i][block_name]
            for name in spec.target_modules:
                if name in block:
                    targets.append((f"model.layers.{i}.{block_name}.{name}", block, name))
    return targets


def apply_lora(model: nn.Module, spec: LoRASpec) -> nn.Module:
    """Wrap the targeted linears of `model` in `LoRALinear`, in place; freeze everything but the adapters."""
    model.freeze()
    for path, parent, name in lora_targets(model, spec):
        layer = parent[name]
        if isinstance(layer, LoRALinear):
            raise ValueError(f"{path} already has a LoRA adapter")
        parent[name] = LoRALinear(layer, spec.rank, spec.alpha, spec.dropout)
    mx.eval(model.trainable_parameters())
    return model


def _dense_replacement(module: nn.Module, dtype) -> nn.Module | None:
    if isinstance(module, LoRALinear):
        return module.merge(dtype)
    if isinstance(module, QuantizedLinear):
        in_features, out_features = module.in_features, module.out_features
        linear = nn.Linear(in_features, out_features, bias="bias" in module)
        linear.weight = module.dequantize(dtype)
        if "bias" in module:
            linear.bias = module.bias.astype(dtype)
        return linear
    if isinstance(module, QuantizedEmbedding):
        table = module.dequantize(dtype)
        embedding = nn.Embedding(*table.shape)
        embedding.weight = table
        return embedding
    return None


def merge_lora(model: nn.Module, dtype=mx.float32) -> nn.Module:
    """Fold every adapter into its base and dequantize every quantized layer, in place.

    Each `LoRALinear` becomes an `nn.Linear` with weight `dequantize(base) + (alpha/r) * B @ A` (float32 math,
    stored in `dtype`); other quantized layers become dense too. Returns `model`, now of plain modules,
    unfrozen. Layers are replaced one decoder layer at a time and evaluated, so memory grows gradually.
    """
    if isinstance(dtype, str):
        from models.backend import compute_dtype

        dtype = compute_dtype(dtype)

    def replace_children(parent: nn.Module | list) -> None:
        slots = list(parent.items()) if isinstance(parent, dict) else list(enumerate(parent))
        for key, child in slots:
            if isinstance(child, nn.Module):
                dense = _dense_replacement(child, dtype)
                if dense is not None:
                    parent[key] = dense
                    mx.eval(dense.parameters())  # one dense weight at a time, never the whole model
                else:
                    replace_children(child)
            elif isinstance(child, list):
                replace_children(child)

    replace_children(model)
    model.unfreeze()
    mx.eval(model.parameters())
    return model


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of scalar parameters that receive gradients."""
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
