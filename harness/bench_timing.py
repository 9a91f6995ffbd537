"""What `harness.bench` and its mlx-lm baseline (`harness.mlx_lm_baseline`) share: synchronized timing, synthetic
tokens, the build's peak memory, and the raw measurements of one timed stack."""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx

from models.mistral import ModelArgs


@dataclass
class StackTimes:
    """One stack's raw measurements, which `harness.bench.make_result` turns into a result row."""

    args: ModelArgs  # the model's shape
    checkpointing: bool
    trainable: int  # trainable parameters
    times: list[float]  # seconds of each timed optimizer step
    first_step: float  # process start -> end of the first step (seconds)
    dtype: mx.Dtype  # compute dtype
    quant: str  # how the base weights are stored, for the table
    build_peak: float  # GB, building the model (`build_peak_then_reset`)
    # With batches of real lengths (`--dolly-lengths`): their mean width, non-padding tokens and padding share.
    seq: int | None = None
    real_tokens: int | None = None
    padding: float = 0.0


def timed_runs(fn, *, warmup: int, repeat: int) -> list[float]:
    """Seconds of each of `repeat` calls of `fn` (which must synchronize), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def synthetic_tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> mx.array:
    """Random token ids `(batch, seq)` (never 0, the padding id): every position is a loss token."""
    return mx.random.randint(3, vocab, (batch, seq), key=mx.random.key(seed)).astype(mx.int32)


def build_peak_then_reset(*arrays) -> float:
    """Evaluate `arrays` (the built model), return MLX's peak memory so far (GB) and start a new peak, so that
    a result's `peak_memory_gb` is the training steps' own."""
    mx.eval(*arrays)
    peak = mx.get_peak_memory() / 1e9
    mx.reset_peak_memory()
    return peak
