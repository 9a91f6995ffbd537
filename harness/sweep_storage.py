"""Where an Optuna study lives: the storage every sweep worker and every job opens, and a Hydra callback that
creates the folder of a SQLite file before the sweep starts.

`open_storage` gives SQLite a busy timeout (several local processes write to one file; without it a writer
that finds the file locked fails at once) and switches on Optuna's heartbeat, so a trial whose worker died is
failed by the next worker that looks (and retried once, by default) instead of staying RUNNING forever.
PostgreSQL URLs (`postgresql://user@host:port/db`) go to the same RDB storage through psycopg2.

The Optuna sweeper opens `hydra.sweeper.storage` before Hydra creates the sweep directory, so a
`sqlite:///<dir>/optuna.db` in a folder that does not exist yet fails with "unable to open database file".
`on_multirun_start` runs before the sweeper opens its storage.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

SQLITE_PREFIX = "sqlite:///"
T = TypeVar("T")

# Optuna warns about what this project does on purpose, once per trial or sweep: heartbeats outside
# `Study.optimize` (the sweeper asks, launches and tells itself, with its own heartbeat thread) and the heartbeat
# API being experimental (used as documented, versions pinned). The warnings would bury the sweep's own output.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
warnings.filterwarnings("ignore", message=r".*(RetryHeartbeatStaleTrialCallback|heartbeat_interval|fail_stale_trials).*"
                        r"is experimental")
warnings.filterwarnings("ignore", message=r"Argument ``heartbeat_interval`` is an experimental feature")


def sqlite_path(storage: str | None) -> Path | None:
    """The database file of a `sqlite:///path` URL (relative to the working directory), else None."""
    if not storage or not str(storage).startswith(SQLITE_PREFIX):
        return None
    return Path(str(storage)[len(SQLITE_PREFIX) :].split("?", 1)[0])


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    max_retry: int | None = None,
    sqlite_timeout: float = 60.0,
):
    """An `optuna.storages.RDBStorage` for `url` (sqlite:/// or postgresql://).

    `heartbeat_interval` (seconds) turns on heartbeats: a RUNNING trial whose heartbeat is older than
    `grace_period` seconds is failed by `optuna.storages.fail_stale_trials`, and re-queued (same parameters)
    up to `max_retry` times. `sqlite_timeout` (seconds) is how long a SQLite writer waits for a lock.
    """
    import optuna

    engine_kwargs: dict[str, Any] = {}
    if sqlite_path(url) is not None:
        engine_kwargs["connect_args"] = {"timeout": sqlite_timeout}
    else:
        engine_kwargs["pool_pre_ping"] = True  # a server that dropped an idle connection is reconnected
    callback = None
    if heartbeat_interval and max_retry:
        callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    from sqlalchemy.exc import IntegrityError

    # Workers starting together on a new database race to create its tables; the loser finds them made.
    return with_retries(
        lambda: optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval or None,
            grace_period=grace_period if heartbeat_interval else None,
            heartbeat_stale_trial_callback=callback,
        ),
        also=(IntegrityError,),
    )


def with_retries(
    action: Callable[[], T], *, attempts: int = 5, wait_s: float = 1.0, also: tuple[type, ...] = ()
) -> T:
    """`action()`, tried again (after `wait_s`, doubling) when the database says it is locked or busy.

    The busy timeout covers most SQLite contention; this covers the rest (a lock held past the timeout,
    a PostgreSQL serialization failure) for the writes a sweep cannot afford to lose, such as telling a result.
    `also`: more exception types worth another try.
    """
    from sqlalchemy.exc import OperationalError

    for attempt in range(attempts):
        try:
            return action()
        except (OperationalError, *also):
            if attempt == attempts - 1:
                raise
            time.sleep(wait_s * 2**attempt)
    raise AssertionError("unreachable")


class CreateSqliteStorageDir(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        storage = config.hydra.sweeper.get("storage")
        path = sqlite_path(storage)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
