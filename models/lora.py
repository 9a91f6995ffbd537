"""LoRA (Hu et al. 2021) applied from outside the model: wrap target linears, freeze everything else.

`LoRALinear` computes `y = base(x) + (alpha / r) * dropout(x) @ A^T @ B^T` over any base linear, quantized or
not. `A (r, in)` starts small and random (Kaiming-uniform, as PEFT does), `B (out, r)` starts at zero, so a
freshly wrapped model computes exactly what its base computes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import os
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from models.backend import backend_name
from models.mistral import PROJECTIONS
from models.quant import QuantizedEmbedding, QuantizedLinear


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Which linears get adapters and how big they are.

    rank: r, the inner dimension of `B @ A`. alpha: the adapter output is scaled by `alpha / rank`.
    dropout: probability of zeroing inputs of the adapter branch (training only; rounded to a multiple of 2**-32,
    the kept inputs scaled by the inverse of the exact keep probability: `LoRALinear`). target_modules: projection
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
    # Keys carry no gradient: a differentiated function (`mx.checkpoint`) may take the key as an input.
    token = _DROPOUT_KEY_CHAIN.set([mx.stop_gradient(key)])
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


def _drawn_dropout_key() -> mx.array:
    """The next key of the active chain, else a key drawn from MLX's global random state (as `nn.Dropout` draws)."""
    key = _next_dropout_key()
    if key is None:
        key = mx.random.randint(0, 2**31 - 1, (2,), dtype=mx.int32).astype(mx.uint32)
    return key


# Adapter dropout draws one uniform 32-bit integer per input element and keeps the element when the draw falls
# below `round(keep * 2**32)`: the keep probability is a multiple of 2**-32.
_DRAW_LEVELS = 1 << 32


def dropout_keep_threshold(p: float) -> int:
    """Draws below this integer are kept: `round((1 - p) * 2**32)`, at least 1; `2**32` means no dropout."""
    return max(1, round((1.0 - p) * _DRAW_LEVELS))


def _mix32(v: mx.array) -> mx.array:
    # A bijective integer hash with full avalanche (each input bit flips each output bit with probability about
    # 1/2): it turns consecutive counters into independent-looking 32-bit draws with plain elementwise integer
    # arithmetic, which a compiled graph fuses into the kernel that uses the mask.
    v = v ^ (v >> 16)
    v = v * 0x7FEB352D
    v = v ^ (v >> 15)
    v = v * 0x846CA68B
    return v ^ (v >> 16)


def _uniform_bits(key: mx.array, shape: tuple[int, ...]) -> mx.array:
    """uint32 draws of `shape` from `key` (uint32 `(2,)`): each element's row-major index, hashed under the key.
    Counters are 32-bit: arrays of more than 2**32 elements repeat their draws."""
    rows = math.prod(shape[:-1])
    columns = shape[-1]
    index = mx.arange(rows, dtype=mx.uint32).reshape(*shape[:-1], 1) * columns + mx.arange(columns, dtype=mx.uint32)
    return _mix32(_mix32(index ^ key[0]) ^ key[1])


# How adapter dropout draws its masks, by backend: "hash" (the counter hash above, inside the custom down projection
# below, which keeps nothing of x's size: a few integer operations that a compiled graph fuses into the kernel using
# the mask, on the CPU) or "bernoulli" (MLX's random generator, the dropped input differentiated by MLX itself: on
# CUDA, where MLX does not fuse the hash, this peaked lowest over a whole 7B step); BENCHMARKS.md, "Adapter
# dropout's memory". Other backends take the hash. `QLORA_DROPOUT_DRAW=hash|bernoulli` overrides (benchmarks).
DROPOUT_DRAWS = {"cuda": "bernoulli"}


def dropout_draw() -> str:
    """The mask draw in use here: "hash" or "bernoulli" (see `DROPOUT_DRAWS`)."""
    draw = os.environ.get("QLORA_DROPOUT_DRAW") or DROPOUT_DRAWS.get(backend_name(), "hash")
    if draw not in ("hash", "bernoulli"):
        raise ValueError(f"QLORA_DROPOUT_DRAW={draw!r} should be 'hash' or 'bernoulli'")
    return draw


def _kept(key: mx.array, shape: tuple[int, ...], threshold: int, draw: str) -> mx.array:
    if draw == "hash":
        return _uniform_bits(key, tuple(shape)) < threshold
    return mx.random.bernoulli(threshold / _DRAW_LEVELS, tuple(shape), key=key)


def dropout_mask(key: mx.array, shape: tuple[int, ...], p: float) -> mx.array:
    """The bool mask (True: kept) that adapter dropout of probability `p` draws from `key` (uint32 `(2,)`) for an
    input of `shape`: each element kept independently with probability `dropout_keep_threshold(p) / 2**32`."""
    return _kept(key, tuple(shape), dropout_keep_threshold(p), dropout_draw())


@functools.cache
def _dropout_down_projection(threshold: int, draw: str):
    """`(x, a, key) -> dropout(x) @ a^T`: the adapter's down projection under dropout, with its own backward pass,
    so that autograd keeps nothing of x's size for it beyond x itself (which q, k and v share).

    x `(..., in)`, a `(rank, in)` in x's dtype, key uint32 `(2,)`; returns `(..., rank)`. Kept inputs are scaled
    by `2**32 / threshold`, the inverse of the exact keep probability. The backward pass draws the mask again
    from the key rather than keeping it (`DROPOUT_DRAWS`: drawing is cheaper than keeping a mask or a dropped copy
    of x per adapter until the backward pass).
    """
    scale = _DRAW_LEVELS / threshold

    def kept(key, shape):
        return _kept(key, shape, threshold, draw)

    @mx.custom_function
    def project(x, a, key):
        return (mx.where(kept(key, x.shape), x, 0) @ a.T) * scale

    @project.vjp
    def project_vjp(primals, cotangent, output):
        x, a, key = primals
        # A key that exists only once the cotangent does: inside one compiled graph the backward pass's mask is
        # then neither merged with the forward pass's (which would keep it alive in between) nor drawn early.
        (later_key,) = mx.depends([key], [cotangent])
        keep = kept(later_key, x.shape)
        scaled = cotangent * scale  # (..., rank)
        rank, features = a.shape
        grad_x = mx.where(keep, scaled @ a, 0)
        # (rank, in) laid out by rows; the other order, as MLX's own vjp computes it, raised the layer-by-layer
        # step's peak under dropout (BENCHMARKS.md, "Session 13")
        grad_a = scaled.reshape(-1, rank).T @ mx.where(keep, x, 0).reshape(-1, features)
        return grad_x, grad_a, mx.zeros_like(key)

    return project


class LoRALinear(nn.Module):
    """`base_layer(x) + scale * dropout(x) @ lora_A^T @ lora_B^T`, with only `lora_A`/`lora_B` trainable.

    `lora_A (rank, in)` and `lora_B (out, rank)` are kept in float32 (optimizer precision) and cast to x's
    dtype for the forward pass, so the adapter branch runs in the compute dtype.
    Dropout (training mode only) zeroes each input element of the adapter branch with probability `dropout`
    (rounded to a multiple of 2**-32: `dropout_keep_threshold`) and scales the kept ones by the inverse of the
    exact keep probability. Masks come from the key chain of `dropout_keys` when one is active, else from MLX's
    global random state (as `nn.Dropout`'s); each adapter draws its own.
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
        self._keep_threshold = dropout_keep_threshold(dropout)
        bound = 1.0 / math.sqrt(in_features)  # PEFT: kaiming_uniform_(a=sqrt(5)) on (r, in)
        self.lora_A = mx.random.uniform(-bound, bound, (rank, in_features))
        self.lora_B = mx.zeros((out_features, rank))

    def __call__(self, x: mx.array) -> mx.array:
        """`x (…, in) -> (…, out)` in x's dtype."""
        y = self.base_layer(x)
        a = self.lora_A.astype(x.dtype)
        if self.drops:
            draw, key = dropout_draw(), _drawn_dropout_key()
            if draw == "hash":
                down = _dropout_down_projection(self._keep_threshold, draw)(x, a, key)
            else:  # MLX's generator, the dropped input differentiated by MLX (DROPOUT_DRAWS)
                keep = _kept(key, x.shape, self._keep_threshold, draw)
                down = (mx.where(keep, x, 0) @ a.T) * (_DRAW_LEVELS / self._keep_threshold)
        else:
            down = x @ a.T  # (…, rank)
        if y.dtype == x.dtype:
            # y + scale * down @ B^T in one GEMM (BLAS beta = 1): no separate pass over the (…, out) update.
            b = self.lora_B
            if b.dtype != x.dtype:
                # The cast B takes anyway carries the scale. As the GEMM's alpha, the scale would multiply the whole
                # (…, out) output gradient in the backward pass (MLX's AddMM vjp): at 8 x 512 tokens on an H200,
                # 224 passes and 8.8 ms a step (BENCHMARKS.md, "Session 10").
                return mx.addmm(y, down, (self.scale * b).astype(x.dtype).T)
            # B already in the compute dtype (the layer-by-layer step's views cast once a step): scaling it here
            # would add a kernel per call, where that step is bound by the host launching kernels.
            return mx.addmm(y, down, b.T, alpha=self.scale)
        update = down @ self.lora_B.astype(x.dtype).T
        return y + (self.scale * update).astype(y.dtype)

    def gradient_layouts(self) -> dict[str, str]:
        """How autograd lays out the gradients of `lora_A` and `lora_B` in training: "columns" where MLX
        differentiates `x @ A^T` and `down @ B^T` through the transposed views (the transpose of a row-major
        product), "rows" for A under dropout's hash draw, whose own backward pass computes `(rank, in)` itself.
        The whole-graph step stores each matrix and its optimizer state alike (`harness.step.standard`)."""
        hashed = self._keep_threshold < _DRAW_LEVELS and dropout_draw() == "hash"
        return {"lora_A": "rows" if hashed else "columns", "lora_B": "columns"}

    @property
    def drops(self) -> bool:
        """Whether calls draw a dropout mask now (training mode and a probability that does not round to 0)."""
        return self.training and self._keep_threshold < _DRAW_LEVELS

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


def recomputation_dropout_key(module: nn.Module) -> mx.array | None:
    """For callers that run `module` (a decoder layer) more than once for one forward pass (`mx.checkpoint`): the key
    its adapters' dropout draws from in this pass, to run it under `dropout_keys(key)` each time so that every run
    draws the same masks. None when no adapter in it drops now, and then nothing is drawn."""
    if not any(isinstance(m, LoRALinear) and m.drops for m in module.modules()):
        return None
    return _drawn_dropout_key()


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
