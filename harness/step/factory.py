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
from models.backend import backend_name
from models.recompute import gradient_checkpointing_enabled


TRAIN_STEPS = ("auto", "standard", "layerwise")
# "auto" takes the layer-by-layer step without checkpointing too, on these backends, for micro-batches of at most
# this many tokens (rows x longest row): there a step is bound by the host building and submitting kernels, and the
# layer-by-layer step's small per-layer graphs keep the GPU busy while the next layer is built, which pays more
# than its recomputed forward passes cost (BENCHMARKS.md, "Session 8"). Not measured on Metal: the whole-graph step.
LAYERWISE_MAX_TOKENS = {"cuda": 2048}


def make_train_step(
    model: nn.Module,
    optimizer: optim.Optimizer,
    *,
    grad_clip: float,
    compile: bool = True,
    streams: int = 1,
    kind: str = "auto",
    micro_batch_tokens: int | None = None,
):
    """The training step for `model`, by `kind` (`trainer.train_step`): "layerwise" is `LayerwiseTrainStep`
    (layer by layer, micro-batch by micro-batch, each layer's forward pass recomputed for its backward pass: the
    memory of gradient checkpointing), "standard" `TrainStep` with each micro-batch's rows split over `streams`
    streams (`harness.step.cpu_streams.plan_cpu_streams` chooses how many). "auto": layerwise when the model has
    gradient checkpointing on, or when `micro_batch_tokens` (the largest micro-batch's tokens) is at most
    `LAYERWISE_MAX_TOKENS` on this backend; else standard. Layerwise needs every adapter inside a decoder layer
    (`LayerwiseTrainStep.supports`); "auto" falls back to standard where it does not."""
    if kind not in TRAIN_STEPS:
        raise ValueError(f"trainer.train_step={kind!r}; expected one of {', '.join(TRAIN_STEPS)}")
    if kind == "auto":
        small = micro_batch_tokens is not None and micro_batch_tokens <= LAYERWISE_MAX_TOKENS.get(backend_name(), 0)
        layerwise = LayerwiseTrainStep.supports(model) and (gradient_checkpointing_enabled(model) or small)
        kind = "layerwise" if layerwise else "standard"
    if kind == "layerwise":
        return LayerwiseTrainStep(model, optimizer, grad_clip=grad_clip, compile=compile)
    return TrainStep(model, optimizer, grad_clip=grad_clip, compile=compile, streams=streams)


def configured_train_step(model: nn.Module, optimizer: optim.Optimizer, cfg, *, streams: int = 1,
                          micro_batch_tokens: int | None = None):
    """`make_train_step` as a run's config asks: `optim.grad_clip`, `trainer.compile`, `trainer.train_step`, and
    micro-batches of `micro_batch_tokens` tokens, by default `trainer.batch_size` x `data.max_seq_len`."""
    if micro_batch_tokens is None:
        micro_batch_tokens = cfg.trainer.batch_size * cfg.data.max_seq_len
    return make_train_step(model, optimizer, grad_clip=cfg.optim.grad_clip, compile=cfg.trainer.compile,
                           streams=streams, kind=cfg.trainer.train_step, micro_batch_tokens=micro_batch_tokens)


def make_eval_step(
    model: nn.Module, compile: bool = True, streams: int = 1
) -> Callable[[Batch], tuple[mx.array, mx.array]]:
    """`eval_step(batch) -> (loss_sum, n_tokens)` with the current weights (model state is an input), each
    batch's rows split over `streams` streams as in `TrainStep`."""
    step = rows_on_streams(partial(causal_lm_loss, model), new_streams(streams), model)
    return mx.compile(step, inputs=[model.state]) if compile else step
