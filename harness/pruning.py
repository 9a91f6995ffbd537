"""The job's side of pruning: report each validation loss to the job's Optuna trial and say when to stop.

The project's sweeper (`hydra_plugins/qlora_sweeper`) asks Optuna for a trial, launches the Hydra job with the
trial's number in the environment variable `QLORA_OPTUNA_TRIAL` (through `hydra.job.env_set`, which every
launcher applies where the job runs: in-process, a joblib worker, a Ray task, a Slurm node), and afterwards tells
Optuna how the trial ended. The job opens the same study (storage and study name from the Hydra config), reports
`trial.report(val_loss, step)` at every validation and stops when the pruner says so; it marks the trial with the
user attribute `pruned_at_step`, which the sweeper turns into the PRUNED state.
"""

from __future__ import annotations

import math
import os
from typing import Any

TRIAL_ENV = "QLORA_OPTUNA_TRIAL"  # trial number of the job, set by the sweeper
PRUNED_ATTR = "pruned_at_step"  # user attribute: the optimizer step at which the job stopped
PRUNER_TARGETS = ("optuna.pruners.*",)  # what a pruner config may instantiate


def make_pruner(pruner_cfg: Any):
    """The Optuna pruner described by `pruner_cfg` (a `_target_: optuna.pruners.X` mapping); None or an empty
    mapping gives `NopPruner` (never prunes)."""
    import optuna
    from hydra.utils import instantiate

    if not pruner_cfg:
        return optuna.pruners.NopPruner()
    return instantiate(pruner_cfg, _execution_whitelist_=PRUNER_TARGETS)


class TrialReporter:
    """`reporter(step, val_loss) -> stop`: reports the validation loss (nats/token) at optimizer step `step`
    to the trial and returns True when the trial should stop (pruned)."""

    def __init__(self, trial):
        self.trial = trial
        self.pruned_at_step: int | None = None

    def __call__(self, step: int, val_loss: float) -> bool:
        from harness.sweep_storage import with_retries

        if not math.isfinite(val_loss):  # a diverged run stops by itself and fails
            return False
        with_retries(lambda: self.trial.report(val_loss, step))
        if not with_retries(self.trial.should_prune):
            return False
        with_retries(lambda: self.trial.set_user_attr(PRUNED_ATTR, step))
        self.pruned_at_step = step
        return True


def trial_number_from_env() -> int | None:
    value = os.environ.get(TRIAL_ENV)
    return int(value) if value not in (None, "") else None


def reporter_for_job(sweeper_cfg: Any) -> TrialReporter | None:
    """The reporter of this Hydra job's Optuna trial, or None when the job is not a trial of the project's
    sweeper (a single run, another sweeper, or `sweeper_cfg` without a storage: an in-memory study lives only
    in the sweeper's process and cannot be reached from the job)."""
    number = trial_number_from_env()
    if number is None or sweeper_cfg is None or not sweeper_cfg.get("storage"):
        return None
    import optuna

    from harness.sweep_storage import open_storage, with_retries

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(str(sweeper_cfg.storage), sqlite_timeout=sweeper_cfg.get("sqlite_timeout", 60.0))
    study = with_retries(
        lambda: optuna.load_study(
            study_name=sweeper_cfg.study_name, storage=storage, pruner=make_pruner(sweeper_cfg.get("pruner"))
        )
    )
    trial_id = with_retries(
        lambda: storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    )
    return TrialReporter(optuna.trial.Trial(study, trial_id))

