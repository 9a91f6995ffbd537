"""How a command's outcome becomes its exit status and its last words.

- A user error (a bad config value, a damaged or foreign run directory, bad data, a full disk) is one line on
  stderr naming the key or file, and exit status 2: a traceback adds nothing a user can act on. In a sweep it
  is raised instead, so the sweeper records the trial as failed and goes on.
- A run stopped by SIGINT/SIGTERM prints what was saved and how to resume, and exits with 128 + the signal.
- A single run whose loss diverged exits with status 1 (a sweep records it as a failed trial).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.run_state import RunStateError, read_state
from harness.config_checks import ConfigError
from harness.console import note
from harness.data.errors import DataError
from harness.resume import ResumeError
from harness.signals import RunInterrupted
from models.adapters import AdapterError
from models.atomic_files import DiskWriteError
from models.loading import PretrainedWeightsError
from models.mistral import ModelConfigError
from models.tokenizer import TokenizerError

USER_ERRORS = (
    ConfigError, ResumeError, RunStateError, DataError, AdapterError, PretrainedWeightsError, ModelConfigError,
    TokenizerError, DiskWriteError,
)
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 1


def in_sweep() -> bool:
    """Whether this process runs a Hydra multirun (`-m`)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN"


def hydra_task(task: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap a Hydra task function so user errors end a single run with one line (module docstring)."""

    @functools.wraps(task)
    def run(cfg):
        try:
            return task(cfg)
        except USER_ERRORS as err:
            if in_sweep():
                raise
            note(f"error: {err}")
            sys.exit(EXIT_USER_ERROR)

    return run


def exit_if_diverged(objective: float, run_dir: str | Path | None) -> None:
    """End a single (not sweep) training run with status 1 when its loss diverged."""
    if in_sweep() or run_dir is None or not (isinstance(objective, float) and math.isnan(objective)):
        return
    state = read_state(Path(run_dir))
    if state is not None and state.diverged:
        note(f"error: the run diverged at step {state.step} (loss nan/inf); see {Path(run_dir) / 'metrics.jsonl'}")
        sys.exit(EXIT_DIVERGED)


def run_command(main: Callable[[], Any]) -> None:
    """Call a Hydra main function; a stop on a signal prints its message and exits 128 + the signal."""
    try:
        main()
    except RunInterrupted as stop:
        note(stop.message)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        note("interrupted")
        sys.exit(130)
