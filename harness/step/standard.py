"""The standard training step: the whole step as compiled graphs (`harness.step.factory` chooses it)."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn

from harness.step.accumulate import Batch, accumulate_gradients, make_update, rows_on_streams
from harness.step.cpu_streams import new_streams
from harness.step.loss import causal_lm_loss
from harness.step.stacked import parameter_place
from models.lora import LoRALinear


class TrainStep:
    """One optimizer step over a list of micro-batches: `step(batches) -> (loss_sum, n_tokens, grad_norm)`.

    Compiled with the model's and optimizer's state (and the RNG, for dropout) as implicit inputs and outputs,
    as MLX's docs describe. Gradients and the update are two compiled graphs, and the gradients are scheduled
    (`mx.async_eval`) before the update is built: in one graph, with gradient clipping (the update waits for the
    norm of all gradients), MLX kept part of every layer's backward pass alive until the end of the step; with
    checkpointing that grew the step's memory by a few activations per layer (tests/harness/test_train_step_memory.py).
    `streams > 1` splits each micro-batch's rows over that many streams (`harness.step.cpu_streams`).
    With `adapters_by_columns`, the adapter matrices and their optimizer state are laid out as their gradients come
    (`lay_out_by_columns`).
    """

    adapters_by_columns = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer,
        *,
        grad_clip: float,
        compile: bool = True,
        streams: int = 1,
    ):
        self.model = model
        self.optimizer = optimizer
        if self.adapters_by_columns:
            lay_out_by_columns(model, optimizer)
        loss_and_grad = nn.value_and_grad(model, causal_lm_loss)

        def gradients(batch: Batch):
            (loss_sum, n_tokens), grads = loss_and_grad(model, batch)
            return loss_sum, n_tokens, grads

        self.streams = new_streams(streams)
        gradients = rows_on_streams(gradients, self.streams, model)
        if compile:
            state = [model.state, optimizer.state, mx.random.state]
            gradients = partial(mx.compile, inputs=state, outputs=state)(gradients)
        # The update array by array, adapters cast where used: on an H200 this step measured no faster with the
        # adapters stacked (`harness.step.stacked`, as the layer-by-layer step keeps them), and slower with them
        # cast once a step (BENCHMARKS.md, "Session 9").
        self._gradients, self._update = gradients, make_update(model, optimizer, grad_clip, compile)

    def __call__(self, batches: list[Batch]) -> tuple[mx.array, mx.array, mx.array]:
        loss_sum, n_tokens, grads = accumulate_gradients(self._gradients, batches)
        mx.async_eval(loss_sum, n_tokens, grads)
        return loss_sum, n_tokens, self._update(grads, n_tokens)


def _by_columns(array: mx.array) -> mx.array:
    """`array` (2-D) with the same values, laid out by columns."""
    return mx.contiguous(array.T).T


def lay_out_by_columns(model: nn.Module, optimizer: optim.Optimizer) -> None:
    """Lay out each adapter matrix whose gradient autograd hands out by columns (`LoRALinear.gradient_layouts`), and
    the optimizer's arrays of its shape, by columns too. The optimizer's fused update then reads and writes one
    layout: on a GPU, with row-major parameters and moments beside column-major gradients it ran MLX's strided
    kernel (BENCHMARKS.md, "Session 13"). An element-wise update whose inputs are all laid out by columns writes
    its outputs so too, so the layout holds from step to step; the values are the same either way (checkpoints
    store them by rows). Initializes the optimizer's state (`optimizer.init`) where it has none yet."""
    optimizer.init(model.trainable_parameters())
    for path, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        for name, layout in module.gradient_layouts().items():
            if layout != "columns":
                continue
            parameter = _by_columns(getattr(module, name))
            setattr(module, name, parameter)
            container, key = parameter_place(optimizer.state, f"{path}.{name}")
            state = container[key]
            for field, value in state.items():
                if isinstance(value, mx.array) and value.shape == parameter.shape:
                    state[field] = _by_columns(value)
    mx.eval(model.trainable_parameters(), optimizer.state)
