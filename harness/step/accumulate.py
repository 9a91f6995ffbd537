"""What every training step shares: gradient sums over micro-batches, CPU streams and ranks, and the update."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten, tree_map

from harness.distributed import world
from harness.step.cpu_streams import split_rows

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


def rows_on_streams(fn: Callable[[Batch], Any], streams: list[mx.Stream]) -> Callable[[Batch], Any]:
    """`fn(batch)`, whose outputs add up over rows (loss sums, token counts, gradients), with each batch's rows
    split over `streams`, one piece each, and the pieces' outputs summed (`harness.step.cpu_streams`). No streams:
    `fn` itself."""
    if not streams:
        return fn

    def split_fn(batch: Batch):
        outputs = []
        for stream, piece in zip(streams, split_rows(batch, len(streams))):
            with mx.stream(stream):
                outputs.append(fn(piece))
        return sum_outputs(outputs)

    return split_fn


def make_update(model: nn.Module, optimizer: optim.Optimizer, grad_clip: float, compile: bool = True):
    """`update(grads, n_tokens) -> grad_norm`: divide summed gradients by the loss tokens, clip their global norm
    to `grad_clip` (0 = off), apply the optimizer to `model`. Compiled with the model and optimizer state."""

    def update(grads: dict, n_tokens: mx.array) -> mx.array:
        grads = tree_map(lambda g: g / mx.maximum(n_tokens, 1).astype(g.dtype), grads)
        if grad_clip > 0:
            grads, norm = optim.clip_grad_norm(grads, grad_clip)
        else:
            norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))
        optimizer.update(model, grads)
        return norm

    if compile:
        state = [model.state, optimizer.state, mx.random.state]
        update = partial(mx.compile, inputs=state, outputs=state)(update)
    return update
