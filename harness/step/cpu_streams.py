"""One micro-batch's rows split over several CPU streams, so that every core works all the time.

MLX's CPU backend runs each stream's kernels on one thread: only BLAS calls use more cores. On two cores about
half of a small model's training step was single-threaded work (softmax, SiLU, norms, the loss's per-logit
work) while the other core waited. With one stream per core, each multiplying on a one-thread BLAS, both cores
run the matmuls and the elementwise work of their own rows. The summed loss, token count and gradients are those
of one stream: the loss is a sum over tokens, so splitting rows changes only the order of additions.

Streams run side by side only if MLX's evaluation order interleaves them. MLX orders a graph's kernels
breadth-first up to `MLX_BFS_MAX_WIDTH` arrays wide (default 20), depth-first beyond, and stops queueing after a
few kernels until one finishes: at the default width it queued one stream's whole share of a step before the
next stream's, so the streams took turns (BENCHMARKS.md, "Why the code is as it is"). MLX reads the
width once, at the first evaluation of the process, so `plan_cpu_streams` must run before anything is evaluated
(the trainer and `harness.bench` call it before building the model); later, the streams still give the same
numbers, only no faster. A wide order defeats `mx.checkpoint` (recomputations run early and their activations
stay alive), so checkpointed training keeps one stream and MLX's default order.
"""

from __future__ import annotations

import os
import warnings

import mlx.core as mx

from models import blas
from models.backend import is_cpu

Batch = dict[str, mx.array]


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity API
        return os.cpu_count() or 1


# Breadth-first width of MLX's evaluation order that lets two streams' shares of a step interleave: comfortably
# above the narrowest width that did (BENCHMARKS.md, "Why the code is as it is").
EVAL_ORDER_WIDTH = "1024"


def plan_cpu_streams(requested: int | None, batch_size: int, *, checkpointing: bool = False) -> int:
    """How many streams share each micro-batch's rows, with the BLAS's threads and MLX's order set to match.

    `requested`: None = automatic (on the CPU backend, one stream per core up to `batch_size`, each with
    `cores // streams` BLAS threads; one stream where the loaded BLAS's threads cannot be set, as with MLX's own
    BLAS or Accelerate, and with gradient checkpointing); 1 = off; n > 1 = n streams. GPU backends always get
    one stream (their kernels are already parallel). Call it before MLX evaluates anything (see above): for more
    than one stream it sets the BLAS's threads for the process and `MLX_BFS_MAX_WIDTH` unless that is set.
    """
    if requested is not None and requested < 1:
        raise ValueError(f"trainer.cpu_streams must be null (automatic) or at least 1, got {requested}")
    if not is_cpu() or checkpointing:
        if requested not in (None, 1):
            reason = "the CPU backend without gradient checkpointing"
            warnings.warn(f"trainer.cpu_streams={requested} applies to {reason} only; using 1", stacklevel=2)
        return 1
    cores = cpu_cores()
    if requested is None:
        if blas.blas_threads() is None:
            return 1
        requested = min(cores, batch_size)
    streams = max(1, min(requested, batch_size))
    if streams > 1:
        blas.set_blas_threads(max(1, cores // streams))
        os.environ.setdefault("MLX_BFS_MAX_WIDTH", EVAL_ORDER_WIDTH)
    return streams


def split_rows(batch: Batch, parts: int) -> list[Batch]:
    """`batch` cut along its first (row) axis into `parts` nearly equal, non-empty pieces, in order."""
    rows = next(iter(batch.values())).shape[0]
    parts = max(1, min(parts, rows))
    bounds = [round(i * rows / parts) for i in range(parts + 1)]
    return [{key: value[start:stop] for key, value in batch.items()} for start, stop in zip(bounds, bounds[1:])]


def new_streams(count: int) -> list[mx.Stream]:
    """`count` new streams on the default device (none for a count of 1: the default stream serves)."""
    return [mx.new_stream(mx.default_device()) for _ in range(count)] if count > 1 else []
