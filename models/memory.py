"""The one memory policy per backend: MLX's wired and memory limits, and when MLX's buffer cache is emptied.

MLX keeps freed buffers in a cache for reuse and waits for queued work once its memory limit is reached. On Metal
(unified memory) the GPU can only keep the "recommended working set" resident (`max_recommended_working_set_size`
of `mx.device_info()`, below physical RAM); MLX's default memory limit lies above it, so a step that outgrows the
working set pages or swaps before MLX holds back. The policy:

| backend | wired limit | memory limit (`trainer.memory_limit_gb` null) | `trainer.memory_limit_gb` set |
|---|---|---|---|
| metal | the recommended working set: model buffers stay resident | `METAL_MEMORY_FRACTION` x the working set | that many GB |
| cuda  | none (device memory is not paged)                       | MLX's default                              | that many GB |
| cpu   | none                                                     | MLX's default                              | that many GB |

The cache is emptied (`release_cache`) where a phase's temporaries will not be reused: after building
(quantizing) the base, after each validation pass and after each exported shard.
`apply_memory_policy` is applied once per process, before the model is built (`harness.process.set_up_process`).
"""

from __future__ import annotations

import dataclasses
import warnings

import mlx.core as mx

from models.backend import backend_name

# Memory limit on Metal as a fraction of the recommended working set: MLX waits for queued work before going
# past it, instead of letting the GPU page.
METAL_MEMORY_FRACTION = 1.0


@dataclasses.dataclass(frozen=True)
class MemoryPolicy:
    """What `apply_memory_policy` set, in bytes (None: left at MLX's default)."""

    backend: str
    working_set_bytes: int | None  # Metal's recommended working set; None elsewhere
    wired_limit_bytes: int | None
    memory_limit_bytes: int | None


def recommended_working_set() -> int | None:
    """Bytes the GPU may keep resident (Metal's `max_recommended_working_set_size`); None on other backends."""
    if backend_name() != "metal":
        return None
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    size = info.get("max_recommended_working_set_size")
    return int(size) if size else None


def memory_policy(memory_limit_gb: float | None = None) -> MemoryPolicy:
    """The limits for this backend (see the module's table), without applying them."""
    backend = backend_name()
    working_set = recommended_working_set()
    if memory_limit_gb is not None and memory_limit_gb <= 0:
        raise ValueError(f"trainer.memory_limit_gb={memory_limit_gb} must be positive (or null for the default)")
    limit = int(memory_limit_gb * 1e9) if memory_limit_gb else None
    if limit is None and working_set is not None:
        limit = int(METAL_MEMORY_FRACTION * working_set)
    if limit is not None and working_set is not None and limit > working_set:
        warnings.warn(
            f"trainer.memory_limit_gb={memory_limit_gb} is above the GPU's recommended working set "
            f"({working_set / 1e9:.1f} GB): memory past it may be paged out",
            stacklevel=3,
        )
    return MemoryPolicy(backend, working_set, working_set, limit)


def apply_memory_policy(memory_limit_gb: float | None = None) -> MemoryPolicy:
    """Set MLX's wired limit (Metal only) and memory limit as `memory_policy` says; returns what was set."""
    policy = memory_policy(memory_limit_gb)
    if policy.wired_limit_bytes is not None:
        mx.set_wired_limit(policy.wired_limit_bytes)
    if policy.memory_limit_bytes is not None:
        mx.set_memory_limit(policy.memory_limit_bytes)
    return policy


def release_cache() -> None:
    """Return MLX's cached free buffers to the system (a phase's temporaries that will not be reused)."""
    mx.clear_cache()
