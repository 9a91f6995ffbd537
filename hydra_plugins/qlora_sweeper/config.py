"""`hydra/sweeper=qlora_optuna`: the Optuna sweeper's options plus pruning, heartbeat and study-bound options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf


@dataclass
class QLoRAOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.qlora_sweeper.sweeper.QLoRAOptunaSweeper"
    # An Optuna pruner (`_target_: optuna.pruners.MedianPruner` ...); null never prunes. See hparams_search/pruner.
    pruner: Any = None
    # Seconds between heartbeats of running trials; null turns heartbeats (and stale-trial recovery) off.
    heartbeat_interval: int | None = 10
    # Seconds without a heartbeat after which a RUNNING trial counts as dead (its worker was killed).
    grace_period: int | None = 60
    # How many times a dead worker's trial is queued again with the same parameters.
    max_retry: int = 1
    # Seconds a SQLite writer waits for the lock held by another worker.
    sqlite_timeout: float = 60.0
    # Trials in the whole study (all workers together); null: each launch runs n_trials more.
    max_study_trials: int | None = None
    # One device per worker process (e.g. [0, 1] with hydra/launcher=joblib_local and 2 workers); null: no choice.
    devices: Any = None
    # Where workers of one host hold their device locks; null: a folder in the temp dir named after the study.
    device_lock_dir: str | None = None


ConfigStore.instance().store(
    group="hydra/sweeper", name="qlora_optuna", node=QLoRAOptunaSweeperConf, provider="mistral-dolly-qlora"
)
