"""The standard training step: the whole step as compiled graphs (`harness.step.factory` chooses it)."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn

from harness.step.accumulate import (Batch, accumulate_gradients, make_update, rows_on_streams,
                                     squared_norms_in_backward_order)
from harness.step.cpu_streams import new_streams
from harness.step.loss import causal_lm_loss
from harness.step.stacked import AdapterStacks


class TrainStep:
    """One optimizer step over a list of micro-batches: `step(batches) -> (loss_sum, n_tokens, grad_norm)`.

    Compiled with the model's and optimizer's state (and the RNG, for dropout) as implicit inputs and outputs,
    as MLX's docs describe. Gradients and the update are two compiled graphs, and the gradients are scheduled
    (`mx.async_eval`) before the update is built: in one graph, with gradient clipping (the update waits for the
    norm of all gradients), MLX kept part of every layer's backward pass alive until the end of the step; with
    checkpointing that grew the step's memory by a few activations per layer (tests/harness/test_train_step_memory.py).
    `streams > 1` splits each micro-batch's rows over that many streams (`harness.step.cpu_streams`).

    `stack_adapters` (element-wise optimizers such as AdamW): the adapters and the optimizer's moments are kept
    stacked by shape and the model computes on views of the stacks (`harness.step.stacked`); each micro-batch's
    gradients are joined into stacks after its backward pass is scheduled, and the update runs once per stack.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer,
        *,
        grad_clip: float,
        compile: bool = True,
        streams: int = 1,
        stack_adapters: bool = False,
        norms_with_gradients: bool = False,
    ):
        self.model = model
        self.optimizer = optimizer
        self.norms_with_gradients = norms_with_gradients
        self.stacks = stacks = AdapterStacks.build(model, optimizer) if stack_adapters and streams <= 1 else None
        loss_and_grad = nn.value_and_grad(model, causal_lm_loss)

        def gradients(batch: Batch):
            (loss_sum, n_tokens), grads = loss_and_grad(model, batch)
            return loss_sum, n_tokens, grads

        self.streams = new_streams(streams)
        gradients = rows_on_streams(gradients, self.streams, model)
        if compile:
            state = [model.state, optimizer.state, mx.random.state] + ([stacks.arrays] if stacks else [])
            gradients = partial(mx.compile, inputs=state, outputs=state)(gradients)
        # The update array by array, adapters cast where used: on an H200 this step measured no faster with the
        # adapters stacked (`harness.step.stacked`, as the layer-by-layer step keeps them), and slower with them
        # cast once a step (BENCHMARKS.md, "Session 9").
        self._gradients = gradients
        self._update = make_update(model, optimizer, grad_clip, compile, stacks=stacks)

    def _micro_batch(self, batch: Batch) -> tuple[mx.array, mx.array, dict]:
        """One micro-batch's `(loss_sum, n_tokens, grads)`, the gradients joined into stacks where the adapters
        are stacked. The backward pass is scheduled first: a join inside its graph waits for every layer's
        gradients, and MLX then kept part of each layer's backward pass alive until the end
        (tests/harness/test_train_step_memory.py)."""
        loss_sum, n_tokens, grads = self._gradients(batch)
        if self.stacks is None:
            return loss_sum, n_tokens, grads
        mx.async_eval(loss_sum, n_tokens, grads)
        return loss_sum, n_tokens, self.stacks.stack(grads)

    def __call__(self, batches: list[Batch]) -> tuple[mx.array, mx.array, mx.array]:
        if self.stacks is not None:
            self.stacks.ensure_current(self.optimizer)  # adapters or state loaded since the last step
        loss_sum, n_tokens, grads = accumulate_gradients(self._micro_batch, batches)
        if not self.norms_with_gradients or self.stacks is not None:
            mx.async_eval(loss_sum, n_tokens, grads)
            return loss_sum, n_tokens, self._update(grads, n_tokens)
        squares = squared_norms_in_backward_order(grads)
        mx.async_eval(loss_sum, n_tokens, squares, grads)
        return loss_sum, n_tokens, self._update(grads, n_tokens, squares[::-1])
