"""What every training step shares: gradient sums over micro-batches, CPU streams and ranks, and the update."""

from __future__ import annotations

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
from harness.step.stacked import AdapterStacks
from models.dense_copies import kept_dense_weights, multiplying_by_kept_dense_weights

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
    `fn` itself. With `model`, its decoder layers' and LM head's quantized weights are multiplied as dense copies
    built once for the run (`models.dense_copies`), not rebuilt per stream and pass."""
    if not streams:
        return fn
    if model is not None:
        kept_dense_weights(model)  # built now, outside any compiled function: evaluated once, then constants

    def split_fn(batch: Batch):
        outputs = []
        with multiplying_by_kept_dense_weights(model) if model is not None else nullcontext():
            for stream, piece in zip(streams, split_rows(batch, len(streams))):
                with mx.stream(stream):
                    outputs.append(fn(piece))
        return sum_outputs(outputs)

    return split_fn


def make_update(
    model: nn.Module,
    optimizer: optim.Optimizer,
    grad_clip: float,
    compile: bool = True,
    *,
    stacks: AdapterStacks | None = None,
):
    """`update(grads, n_tokens) -> grad_norm`: scale the summed gradients to the mean over the loss tokens, clip
    their global norm to `grad_clip` (0 = off; as `optim.clip_grad_norm` does), apply the optimizer to `model`.
    Compiled with the model and optimizer state.

    A step with few tokens is bound by the number of kernels, not by arithmetic (BENCHMARKS.md, "Where a small
    step's time goes"), so the update costs few kernels per parameter array: two for its squared norm
    (`squared_norm`), and the optimizer's fused arithmetic, into which the division by the token count and the
    clipping factor fold as one scalar. With `stacks` (`harness.step.stacked.AdapterStacks`, for element-wise
    optimizers such as AdamW) the trainable arrays and the optimizer's state are kept stacked by shape across steps,
    the gradients (per parameter, or stacked already by the step) copied into their stacks, and the norm and the
    optimizer run once per stack (BENCHMARKS.md, "Session 8")."""

    def update(grads: dict, n_tokens: mx.array) -> mx.array:
        if stacks is not None:
            grads = stacks.stack(grads)
        n_tokens = mx.maximum(n_tokens, 1).astype(mx.float32)
        norm = mx.sqrt(sum(squared_norm(g) for _, g in tree_flatten(grads))) / n_tokens
        scale = 1 / n_tokens
        if grad_clip > 0:
            scale = mx.where(norm < grad_clip, scale, scale * (grad_clip / (norm + 1e-6)))
        scaled = tree_map(lambda g: g * scale.astype(g.dtype), grads)
        if stacks is not None:
            stacks.apply(optimizer, scaled)
        else:
            optimizer.update(model, scaled)
        return norm

    if compile:
        state = [model.state, optimizer.state, mx.random.state] + ([stacks.arrays] if stacks is not None else [])
        update = partial(mx.compile, inputs=state, outputs=state)(update)
    if stacks is None:
        return update

    def stacked_update(grads: dict, n_tokens: mx.array) -> mx.array:
        stacks.ensure_current(optimizer)
        norm = update(grads, n_tokens)
        stacks.remember_views()
        return norm

    return stacked_update


def squared_norm(array: mx.array) -> mx.array:
    """Sum of the squares of `array`'s elements as a float32 scalar, taken in the array's own layout.

    Autograd leaves the adapters' gradients laid out by columns; flattening one for a dot product copied it first,
    and the dot product went through the matrix library in two kernels. A square and a sum are two small kernels
    with neither (BENCHMARKS.md, "Session 11")."""
    return mx.square(array.astype(mx.float32)).sum()
