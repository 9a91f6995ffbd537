"""A Hydra callback that creates the folder of the Optuna sweeper's SQLite file before the sweep starts.

The Optuna sweeper opens `hydra.sweeper.storage` before Hydra creates the sweep directory, so a
`sqlite:///<dir>/optuna.db` in a folder that does not exist yet fails with "unable to open database file".
`on_multirun_start` runs before the sweeper opens its storage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

SQLITE_PREFIX = "sqlite:///"


def sqlite_path(storage: str | None) -> Path | None:
    """The database file of a `sqlite:///path` URL (relative to the working directory), else None."""
    if not storage or not str(storage).startswith(SQLITE_PREFIX):
        return None
    return Path(str(storage)[len(SQLITE_PREFIX) :].split("?", 1)[0])


class CreateSqliteStorageDir(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        storage = config.hydra.sweeper.get("storage")
        path = sqlite_path(storage)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
