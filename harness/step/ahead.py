"""A training step built ahead of its launch: the host builds step n+1's graph while the device runs step n.

Between two steps the device would otherwise wait while the host replays the next step's compiled graph: about
35 ms of a 273 ms step at 8 x 512 on an H200, where the GPU was busy 238 ms (BENCHMARKS.md, "Session 10").
A step with a `prepare(batches)` method (`harness.step.standard.TrainStep`) builds its graph there and starts its
work when the returned function is called; other steps do all their work when called.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import mlx.core as mx

Launch = Callable[[], tuple[mx.array, mx.array, mx.array]]


def prepare(train_step: Callable, batches: list) -> Launch:
    """`train_step` on `batches`, as a call that starts it, its graph built now where the step can build ahead.
    Prepare a step only after the step before it was launched: it reads the model's and optimizer's state as the
    launched update leaves them (lazily, so nothing waits for the device)."""
    build_ahead = getattr(train_step, "prepare", None)
    return build_ahead(batches) if build_ahead is not None else partial(train_step, batches)


def start(launch: Launch, model, optimizer, build_next: Callable[[], object] | None = None):
    """Start a prepared step and build the next one while the device runs it: `(outputs, build_next())`.

    The order matters on a GPU, where MLX lets the host run only a few command buffers ahead of the device: the
    step's forward and backward passes are queued first (`launch`), the next step is built while the device works
    through that queue, and only then is the update's work queued, the model's trainable arrays and the optimizer's
    state (many small kernels, which keep the host busy while the device waits for it). The next step is None
    when `build_next` is None."""
    outputs = launch()
    following = build_next() if build_next is not None else None
    mx.async_eval(*outputs, model.trainable_parameters(), optimizer.state)
    return outputs, following
