"""What every command (train, bench, generate, export) does first, before MLX evaluates anything."""

from __future__ import annotations

from omegaconf import DictConfig

from harness.step.cpu_streams import plan_cpu_streams
from models.memory import MemoryPolicy, apply_memory_policy


def set_up_process(trainer: DictConfig | None = None, *, batch_size: int | None = None) -> tuple[int, MemoryPolicy]:
    """Apply the backend's memory policy (`models.memory`, with `trainer.memory_limit_gb`) and plan the CPU
    streams (`harness.step.cpu_streams.plan_cpu_streams`, which may set the BLAS's threads and MLX's evaluation order,
    read at the first evaluation). `trainer`: the `trainer` config of a training run, None for commands that do
    not train (one stream). `batch_size`: rows per micro-batch, `trainer.batch_size` by default.
    Returns (streams per micro-batch, the memory policy applied)."""
    if trainer is None:
        return 1, apply_memory_policy(None)
    policy = apply_memory_policy(trainer.memory_limit_gb)
    streams = plan_cpu_streams(
        trainer.cpu_streams,
        batch_size or trainer.batch_size,
        checkpointing=trainer.gradient_checkpointing,
    )
    return streams, policy
