"""What the training loop evaluates of a step, shared with the benchmark that times it (`harness.bench`)."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

Batch = dict[str, mx.array]


def run_train_step(
    train_step: Callable[[list[Batch]], tuple[mx.array, mx.array, mx.array]], batches: list[Batch]
) -> tuple[mx.array, mx.array, mx.array]:
    """`train_step(batches)` evaluated as far as the training loop needs it: its loss sum, loss tokens and gradient
    norm. The update's new parameters and optimizer state stay in the graph until something reads them: the next
    step's graph (MLX then runs each layer's update as that layer's forward pass reaches it) or a checkpoint."""
    loss_sum, n_tokens, grad_norm = train_step(batches)
    mx.eval(loss_sum, n_tokens, grad_norm)
    return loss_sum, n_tokens, grad_norm
