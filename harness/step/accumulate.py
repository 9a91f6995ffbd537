"""What every training step shares: gradient sums over micro-batches, CPU streams and ranks, and the update."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from harness.distributed import world
from harness.step.cpu_streams import split_rows
from models.quant import dense_weights_shared

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
    `fn` itself. With `model`, its decoder layers' and LM head's quantized weights are dequantized once for all
    streams (and kept for the backward pass) rather than once per stream and pass
    (`models.quant.dense_weights_shared`)."""
    if not streams:
        return fn
    layers = [m for layer in model.model.layers for _, m in layer.named_modules()] if model is not None else []
    if model is not None:  # and the LM head, which every stream's loss dequantizes (`harness.step.loss`)
        layers.append(model.model.embed_tokens if model.args.tie_word_embeddings else model.lm_head)

    def split_fn(batch: Batch):
        outputs = []
        with dense_weights_shared(layers, model.model.norm.weight.dtype) if layers else nullcontext():
            for stream, piece in zip(streams, split_rows(batch, len(streams))):
                with mx.stream(stream):
                    outputs.append(fn(piece))
        return sum_outputs(outputs)

    return split_fn


def make_update(model: nn.Module, optimizer: optim.Optimizer, grad_clip: float, compile: bool = True):
    """`update(grads, n_tokens) -> grad_norm`: scale the summed gradients to the mean over the loss tokens, clip
    their global norm to `grad_clip` (0 = off; as `optim.clip_grad_norm` does), apply the optimizer to `model`.
    Compiled with the model and optimizer state.

    A step with few tokens is bound by the number of kernels, not by arithmetic (BENCHMARKS.md, "Where a small
    step's time goes"): applied array by array, the update of a 7B model's 448 adapter arrays took a fifth of a
    4 x 128 step. So the gradients, parameters and optimizer moments are each laid end to end in one vector
    (`flat_update`), the norm is one dot product and the optimizer's element-wise arithmetic runs once, with the
    token mean and the clipping factor folded in as one scalar; the results are cut back into the arrays as views.
    """

    def update(grads: dict, n_tokens: mx.array) -> mx.array:
        n_tokens = mx.maximum(n_tokens, 1).astype(mx.float32)
        named = tree_flatten(grads)
        flat = _end_to_end([g for _, g in named])
        if flat is None:  # mixed dtypes: array by array
            norm = mx.sqrt(sum(squared_norm(g) for _, g in named)) / n_tokens
        else:
            norm = mx.sqrt(flat @ flat) / n_tokens
        scale = 1 / n_tokens
        if grad_clip > 0:
            scale = mx.where(norm < grad_clip, scale, scale * (grad_clip / (norm + 1e-6)))
        names = [name for name, _ in named]
        if flat is None or not flat_update(model, optimizer, names, flat * scale.astype(flat.dtype)):
            optimizer.update(model, tree_map(lambda g: g * scale.astype(g.dtype), grads))
        return norm

    if compile:
        state = [model.state, optimizer.state, mx.random.state]
        update = partial(mx.compile, inputs=state, outputs=state)(update)
    return update


# The optimizer state's key under which `flat_update` places the moments laid end to end, for one call.
_FLAT_KEY = "__end_to_end__"


def flat_update(model: nn.Module, optimizer: optim.Optimizer, names: list[str], flat_gradient: mx.array) -> bool:
    """Apply `optimizer` to the parameters `names` (dotted paths in `model`) with their gradients laid end to end in
    `flat_gradient`, as one element-wise update (the optimizer's own `apply_gradients` on one vector: its schedule
    and step count advance as usual); the parameters and their optimizer state become views of the results.
    Returns False, changing nothing, when the optimizer's state is not one array per parameter of its shape (then
    update array by array)."""
    parameters = dict(tree_flatten(model.trainable_parameters()))
    arrays = [parameters[name] for name in names]
    try:
        states = [_subtree(optimizer.state, name) for name in names]
    except (KeyError, IndexError, TypeError):  # not initialized yet (`apply_gradients` would do it lazily)
        optimizer.init(model.trainable_parameters())
        states = [_subtree(optimizer.state, name) for name in names]
    keys = sorted(states[0]) if isinstance(states[0], dict) else None
    if keys is None or not all(
        isinstance(state, dict) and sorted(state) == keys
        and all(isinstance(state[k], mx.array) and state[k].shape == p.shape and state[k].dtype == p.dtype
                for k in keys)
        for state, p in zip(states, arrays)
    ):
        return False
    flat_parameters = _end_to_end(arrays)
    if flat_parameters is None or flat_parameters.dtype != flat_gradient.dtype:
        return False
    optimizer.state[_FLAT_KEY] = {k: _end_to_end([state[k] for state in states]) for k in keys}
    try:
        updated = optimizer.apply_gradients({_FLAT_KEY: flat_gradient}, {_FLAT_KEY: flat_parameters})[_FLAT_KEY]
    finally:
        flat_state = optimizer.state.pop(_FLAT_KEY)
    model.update(tree_unflatten(list(zip(names, _cut(updated, arrays)))))
    for k in keys:
        for state, part in zip(states, _cut(flat_state[k], arrays)):
            state[k] = part
    return True


def _end_to_end(arrays: list[mx.array]) -> mx.array | None:
    """The arrays flattened and laid end to end in one vector; None if their dtypes differ."""
    if len({a.dtype for a in arrays}) != 1:
        return None
    return mx.concatenate([a.reshape(-1) for a in arrays])


def _cut(flat: mx.array, like: list[mx.array]) -> list[mx.array]:
    """`flat` cut back into arrays of the shapes of `like` (views: no copy)."""
    ends = list(itertools.accumulate(a.size for a in like))
    return [flat[end - a.size : end].reshape(a.shape) for end, a in zip(ends, like)]


def _subtree(tree, dotted: str):
    """The node at a dotted path (`model.layers.0.mlp`) of a tree of dicts and lists."""
    for key in dotted.split("."):
        tree = tree[int(key)] if isinstance(tree, list) else tree[key]
    return tree


def squared_norm(array: mx.array) -> mx.array:
    """Sum of the squares of `array`'s elements as a float32 scalar, in one kernel (a dot product)."""
    flat = array.reshape(-1).astype(mx.float32)
    return flat @ flat
