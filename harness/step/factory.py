"""One place that builds the steps the loop receives (`harness.loop.train_loop`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn

from harness.step.accumulate import Batch, rows_on_streams
from harness.step.cpu_streams import new_streams
from harness.step.layerwise import LayerwiseTrainStep
from harness.step.loss import causal_lm_loss
from harness.step.standard import TrainStep


def make_train_step(
    model: nn.Module, optimizer: optim.Optimizer, *, grad_clip: float, compile: bool = True, streams: int = 1
):
    """The training step for `model`: `LayerwiseTrainStep` (memory-bounded: layer by layer, micro-batch by
    micro-batch) when it has gradient checkpointing on, else `TrainStep` with each micro-batch's rows split over
    `streams` streams (`harness.step.cpu_streams.plan_cpu_streams` chooses how many)."""
    if LayerwiseTrainStep.supports(model):
        return LayerwiseTrainStep(model, optimizer, grad_clip=grad_clip, compile=compile)
    return TrainStep(model, optimizer, grad_clip=grad_clip, compile=compile, streams=streams)


def make_eval_step(
    model: nn.Module, compile: bool = True, streams: int = 1
) -> Callable[[Batch], tuple[mx.array, mx.array]]:
    """`eval_step(batch) -> (loss_sum, n_tokens)` with the current weights (model state is an input), each
    batch's rows split over `streams` streams as in `TrainStep`."""
    step = rows_on_streams(partial(causal_lm_loss, model), new_streams(streams), model)
    return mx.compile(step, inputs=[model.state]) if compile else step
