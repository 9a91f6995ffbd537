"""What the profile scripts (`small_step_profile.py`, `large_step_profile.py`) share: synchronized medians, and
a table printed row by row as it fills, then written as JSON to $OUT when OUT is set."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import models  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx

from harness.bench_timing import timed_runs


def median_ms(fn, warmup: int = 2, repeat: int = 5) -> float:
    """Median wall milliseconds of `fn()` (which must synchronize)."""
    return statistics.median(timed_runs(fn, warmup=warmup, repeat=repeat)) * 1e3


class ProfileTable:
    """`record(name, value)` prints a row at once (a call cut short keeps what it printed); `write` saves all."""

    def __init__(self, width: int = 62):
        self.rows: dict[str, float] = {}
        self.width = width

    def record(self, name: str, value: float) -> None:
        self.rows[name] = value
        print(f"{name:<{self.width}} {value:12.3f}", flush=True)

    def write(self, name: str, **context) -> None:
        """$OUT/<name>.json: the device, `context` (the run's settings) and the rows, when OUT is set."""
        out = os.environ.get("OUT")
        if out:
            Path(out, f"{name}.json").write_text(json.dumps(
                {"device": str(mx.default_device()), **context, "ms": self.rows}, indent=1))
