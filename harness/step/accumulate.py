"""What every training step shares: gradient sums over micro-batches, CPU streams and ranks, and the update."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten, tree_map

from harness.distributed import world
from harness.step.cpu_streams import split_rows
from models.quant import dense_weights, dense_weights_shared

Batch = dict[str, mx.array]


def accumulate_gradients(
    gradients: Callable[[Batch], tuple], batches: list[Batch]
) -> tuple[mx.array, mx.array, dict]:
    """Summed `(loss_sum, n_tokens, grads)` of `gradients(batch)` over the micro-batches of one step.

    Under a distributed launcher each rank takes its own rows of every batch, and the sums are summed over
    ranks (`harness.distributed`)."""
    ranks = world()
    return ranks.sum_outputs(lambda: sum_outputs([gradients(ranks.rows(batch)) for batch in batches]))


def sum_outputs(outputs: list[Any]) -> Any:
    """Element-wise sum, in order, of equally shaped trees of arrays (e.g. `(loss_sum, n_tokens, grads)`)."""
    return tree_map(lambda *parts: sum(parts[1:], parts[0]), *outputs)


def rows_on_streams(
    fn: Callable[[Batch], Any], streams: list[mx.Stream], model: nn.Module | None = None
) -> Callable[[Batch], Any]:
    """`fn(batch)`, whose outputs add up over rows (loss sums, token counts, gradients), with each batch's rows
    split over `streams`, one piece each, and the pieces' outputs summed (`harness.step.cpu_streams`). No streams:
    `fn` itself. With `model`, its decoder layers' and LM head's quantized weights are multiplied as dense weights
    built once for the run (`persistent_dense_weights`), not once per stream and pass."""
    if not streams:
        return fn
    layers = [m for layer in model.model.layers for _, m in layer.named_modules()] if model is not None else []
    if model is not None:  # and the LM head, which every stream's loss dequantizes (`harness.step.loss`)
        layers.append(model.model.embed_tokens if model.args.tie_word_embeddings else model.lm_head)
    dtype = model.model.norm.weight.dtype if model is not None else None
    dense = persistent_dense_weights(model, layers, dtype) if model is not None else None

    def split_fn(batch: Batch):
        outputs = []
        with dense_weights_shared(layers, dtype, dense) if layers else nullcontext():
            for stream, piece in zip(streams, split_rows(batch, len(streams))):
                with mx.stream(stream):
                    outputs.append(fn(piece))
        return sum_outputs(outputs)

    return split_fn


# Dense copies of a model's frozen quantized weights, by id(model): (what they were built for, the copies).
_DENSE_COPIES: dict[int, tuple[tuple, dict[int, mx.array]]] = {}


def persistent_dense_weights(model: nn.Module, modules: list[nn.Module], dtype: mx.Dtype) -> dict[int, mx.array]:
    """The dense weights of the quantized layers among `modules` (`models.quant.dense_weights`), built and evaluated
    once per model and kept until the model is freed; every step made for the model (training, evaluation) shares
    them. The quantized weights are frozen, so one copy serves the whole run: dequantizing every weight each step
    cost about 0.7 s of a 4-5 s SmolLM2-shape step on a 2-core CPU (BENCHMARKS.md). The streams need the copies
    during every step anyway; kept, they stay allocated between steps too (0.4 GB for SmolLM2-135M in float32)."""
    built_for = (dtype, tuple(id(m) for m in modules))
    entry = _DENSE_COPIES.get(id(model))
    if entry is None or entry[0] != built_for:
        if entry is None:
            weakref.finalize(model, _DENSE_COPIES.pop, id(model), None)
        entry = (built_for, dense_weights(modules, dtype))
        mx.eval(entry[1])
        _DENSE_COPIES[id(model)] = entry
    return entry[1]


def make_update(model: nn.Module, optimizer: optim.Optimizer, grad_clip: float, compile: bool = True):
    """`update(grads, n_tokens) -> grad_norm`: scale the summed gradients to the mean over the loss tokens, clip
    their global norm to `grad_clip` (0 = off; as `optim.clip_grad_norm` does), apply the optimizer to `model`.
    Compiled with the model and optimizer state.

    A step with few tokens is bound by the number of kernels, not by arithmetic (BENCHMARKS.md, "Where a small
    step's time goes"), so the update costs two kernels per parameter array: one dot product for its squared
    norm, and the optimizer's fused arithmetic, into which the division by the token count and the clipping
    factor fold as one scalar."""

    def update(grads: dict, n_tokens: mx.array) -> mx.array:
        n_tokens = mx.maximum(n_tokens, 1).astype(mx.float32)
        norm = mx.sqrt(sum(squared_norm(g) for _, g in tree_flatten(grads))) / n_tokens
        scale = 1 / n_tokens
        if grad_clip > 0:
            scale = mx.where(norm < grad_clip, scale, scale * (grad_clip / (norm + 1e-6)))
        optimizer.update(model, tree_map(lambda g: g * scale.astype(g.dtype), grads))
        return norm

    if compile:
        state = [model.state, optimizer.state, mx.random.state]
        update = partial(mx.compile, inputs=state, outputs=state)(update)
    return update


def squared_norm(array: mx.array) -> mx.array:
    """Sum of the squares of `array`'s elements as a float32 scalar, in one kernel (a dot product)."""
    flat = array.reshape(-1).astype(mx.float32)
    return flat @ flat
