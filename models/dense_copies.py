"""Dense copies of a model's frozen quantized weights, built once and kept while the model lives.

On the CPU a product with a dense weight runs on the BLAS, and rebuilding a 4-bit weight for every call costs more
than the product: about 0.7 s for SmolLM2-135M's 210 weights, against a 4-5 s training step of 8 x 128 on two
cores, or a 0.3 s decoding step of a batch of answers. The weights are frozen, so one dense copy serves the whole
run: training with CPU streams (`harness.step.accumulate.rows_on_streams`), validation and batched generation
(`harness.generate.complete_batch`) all multiply by the same copies (`multiplying_by_kept_dense_weights`). They cost
the dense weights' memory for as long as the model lives (0.4 GB for SmolLM2-135M in float32); on GPUs, where memory
is the point of quantizing, nothing uses them.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import mlx.core as mx
from mlx import nn

from models.quant import dense_weights, dense_weights_shared

# By id(model): (the modules and dtype they were built for, the dense weights by module id); dropped with the model.
_KEPT: dict[int, tuple[tuple, dict[int, mx.array]]] = {}


def weight_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose weights a forward pass multiplies by: every module of the decoder layers and the LM head
    (the embedding table, when the head is tied to it)."""
    modules = [m for layer in model.model.layers for _, m in layer.named_modules()]
    modules.append(model.model.embed_tokens if model.args.tie_word_embeddings else model.lm_head)
    return modules


def kept_dense_weights(model: nn.Module, dtype: mx.Dtype | None = None) -> dict[int, mx.array]:
    """The dense weights of `model`'s quantized layers (`models.quant.dense_weights` over `weight_modules`) in
    `dtype` (the model's compute dtype by default), built and evaluated on the first call and kept until the model
    is freed."""
    dtype = dtype or model.dtype
    modules = weight_modules(model)
    built_for = (dtype, tuple(id(m) for m in modules))
    entry = _KEPT.get(id(model))
    if entry is None or entry[0] != built_for:
        if entry is None:
            weakref.finalize(model, _KEPT.pop, id(model), None)
        entry = (built_for, dense_weights(modules, dtype))
        mx.eval(entry[1])
        _KEPT[id(model)] = entry
    return entry[1]


@contextlib.contextmanager
def multiplying_by_kept_dense_weights(model: nn.Module) -> Iterator[None]:
    """Within this block `model`'s quantized layers multiply by their kept dense copies (`kept_dense_weights`)."""
    dtype = model.dtype
    with dense_weights_shared(weight_modules(model), dtype, kept_dense_weights(model, dtype)):
        yield


__all__ = ["kept_dense_weights", "multiplying_by_kept_dense_weights", "weight_modules"]
