"""The project's Optuna sweeper: hydra-optuna-sweeper's, plus pruning, fresh points at every launch and workers
that share one study safely.

What it adds to `hydra_plugins.hydra_optuna_sweeper` (whose search-space parsing and trial configuration it
reuses):
- Each job learns its trial's number (`QLORA_OPTUNA_TRIAL`, set through `hydra.job.env_set`, which every launcher
  applies where the job runs), so the training loop can report validation losses and be pruned
  (`harness.pruning`); a job that stopped on the pruner's word is told to Optuna as PRUNED.
- The sampler is seeded per trial from `sampler.seed + trial number`. A fresh study is reproducible from its
  seed; a re-run, or a second worker on the same study, gets new trial numbers and so new points (a sampler
  seeded once per launch proposes the same first points at every launch).
- The storage has a SQLite busy timeout and Optuna's heartbeat: while a batch runs, its trials' heartbeats are
  recorded; before each batch, trials whose heartbeat is older than `grace_period` (their worker died) are
  failed and re-queued `max_retry` times with the same parameters.
- `max_study_trials` bounds the study as a whole, for several workers sharing it: a worker asks for new trials
  only while finished + running + queued trials are fewer, and, before it leaves, waits for other workers'
  running trials to finish or go stale, so a dead worker's trial is re-run rather than lost.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import optuna
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides

log = logging.getLogger(__name__)
SAMPLER_TARGETS = ("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")
# Trials that hold a place in a study bounded by `max_study_trials`.
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
SURPLUS_ATTR = "surplus"  # user attribute of a trial asked beyond `max_study_trials` by a racing worker


def tell(study: optuna.Study, trial: optuna.trial.Trial, **result: Any) -> None:
    """`study.tell(trial, **result)`. The grid sampler calls `study.stop()` once its grid is done, which Optuna
    refuses outside `study.optimize`; the result is stored before that, so that refusal is ignored."""
    try:
        study.tell(trial, **result)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise


class Heartbeat:
    """Records the heartbeat of `trial_ids` every `interval` seconds in a background thread while open."""

    def __init__(self, storage: Any, trial_ids: list[int], interval: int | None):
        self.storage, self.trial_ids, self.interval = storage, trial_ids, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        while True:
            for trial_id in self.trial_ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as err:  # noqa: BLE001 - a missed beat is retried at the next interval
                    log.warning(f"heartbeat of trial id {trial_id} failed: {err}")
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        if self.interval and self.storage is not None:
            self._thread = threading.Thread(target=self._beat, name="optuna-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class QLoRAOptunaSweeperImpl(OptunaSweeperImpl):
    def __init__(
        self,
        sampler_cfg: DictConfig,
        *args: Any,
        pruner: Any,
        heartbeat_interval: int | None,
        grace_period: int | None,
        max_retry: int,
        sqlite_timeout: float,
        max_study_trials: int | None,
    ) -> None:
        self.sampler_cfg = sampler_cfg
        super().__init__(self._new_sampler(sampler_cfg.get("seed")), *args)
        self.pruner_cfg = pruner
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.max_retry = max_retry
        self.sqlite_timeout = sqlite_timeout
        self.max_study_trials = max_study_trials

    def _new_sampler(self, seed: int | None) -> Any:
        overrides = {} if seed is None or "seed" not in self.sampler_cfg else {"seed": seed}
        return instantiate(self.sampler_cfg, **overrides, _execution_whitelist_=SAMPLER_TARGETS)

    def _reseeds(self) -> bool:
        """Whether samplers are seeded per trial: a seeded sampler that is not the grid (which walks its grid)."""
        return self.sampler_cfg.get("seed") is not None and not self.sampler_cfg.get("_partial_", False)

    def _ask(self, study: optuna.Study) -> optuna.trial.Trial:
        """A trial whose parameters the sampler will draw seeded with `seed + trial number`."""
        from harness.sweep_storage import with_retries

        trial = with_retries(study.ask)
        if self.heartbeat_interval and self.storage:  # at once: a trial without a heartbeat never goes stale
            with_retries(lambda: study._storage.record_heartbeat(trial._trial_id))
        if not self._reseeds():
            return trial
        study.sampler = self._new_sampler(int(self.sampler_cfg.seed) + trial.number)
        # A trial draws its relative (joint) parameters when it is built: rebuild it with the reseeded sampler.
        return optuna.trial.Trial(study, trial._trial_id)

    def _ask_batch(
        self, study: optuna.Study, size: int, trials: list[optuna.trial.Trial], configure: Any
    ) -> list[tuple[str, ...]]:
        """Ask up to `size` trials into `trials` (fewer when a racing worker filled a bounded study) and return
        each one's overrides, `configure(trial)` plus its trial number. Each trial draws its parameters as soon
        as it is asked, while the sampler is the one seeded for it: a batch draws what one trial at a time would."""
        from harness.pruning import TRIAL_ENV
        from harness.sweep_storage import with_retries

        overrides = []
        for _ in range(size):
            trial = self._ask(study)
            if self._is_surplus(study, trial):
                with_retries(lambda: trial.set_user_attr(SURPLUS_ATTR, True))
                with_retries(lambda: tell(study, trial, state=TrialState.FAIL))
                break
            trials.append(trial)
            overrides.append((*configure(trial), f"++hydra.job.env_set.{TRIAL_ENV}={trial.number}"))
        return overrides

    def _open_study(self, directions: list[str]) -> optuna.Study:
        from harness.pruning import make_pruner
        from harness.sweep_storage import open_storage, with_retries

        storage = self.storage
        if storage:
            storage = open_storage(
                str(storage),
                heartbeat_interval=self.heartbeat_interval,
                grace_period=self.grace_period,
                max_retry=self.max_retry,
                sqlite_timeout=self.sqlite_timeout,
            )
        return with_retries(
            lambda: optuna.create_study(
                study_name=self.study_name,
                storage=storage,
                sampler=self.sampler,
                pruner=make_pruner(self.pruner_cfg),
                directions=directions,
                load_if_exists=True,
            )
        )

    def _room(self, study: optuna.Study) -> tuple[int | None, int]:
        """(new trials the study bound still allows or None without a bound, trials running elsewhere)."""
        trials = study.get_trials(deepcopy=False, states=COUNTED_STATES)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if self.max_study_trials is None:
            return None, running
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        return max(0, self.max_study_trials - len(trials)) + waiting, running

    def _is_surplus(self, study: optuna.Study, trial: optuna.trial.Trial) -> bool:
        """Whether `trial` was asked beyond `max_study_trials` (two workers asked at the same moment)."""
        if self.max_study_trials is None:
            return False
        ahead = [
            t for t in study.get_trials(deepcopy=False, states=COUNTED_STATES) if t.number <= trial.number
        ]
        return len(ahead) > self.max_study_trials

    def _tell(self, study: optuna.Study, trial: optuna.trial.Trial, ret: JobReturn, n_objectives: int) -> bool:
        """Tell Optuna how the job of `trial` ended; returns False when the job failed (raised or no number)."""
        from harness.pruning import PRUNED_ATTR
        from harness.sweep_storage import with_retries

        storage = study._storage
        frozen = with_retries(lambda: storage.get_trial(trial._trial_id))
        if frozen.state != TrialState.RUNNING:  # failed as stale by another worker meanwhile
            log.warning(f"trial {trial.number} is {frozen.state.name} already; its result is not recorded")
            return True
        try:
            value = ret.return_value
            values = [float(value)] if n_objectives == 1 else [float(v) for v in value]
        except Exception as err:  # noqa: BLE001 - the job raised, or returned something that is not a number
            log.warning(f"trial {trial.number} failed: {err}")
            with_retries(lambda: tell(study, trial, state=TrialState.FAIL))
            return False
        if PRUNED_ATTR in frozen.user_attrs:
            with_retries(lambda: tell(study, trial, state=TrialState.PRUNED))
        elif all(math.isfinite(v) for v in values):
            with_retries(lambda: tell(study, trial, values=values))
        else:  # a diverged run: FAIL, and the sweep goes on
            with_retries(lambda: tell(study, trial, state=TrialState.FAIL))
        return True

    @staticmethod
    def _fail_running(study: optuna.Study, trials: list[optuna.trial.Trial]) -> None:
        for trial in trials:
            try:
                if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                    tell(study, trial, state=TrialState.FAIL)
            except Exception as err:  # noqa: BLE001 - the heartbeat policy fails it later instead
                log.warning(f"could not fail trial {trial.number}: {err}")

    def sweep(self, arguments: list[str]) -> None:
        from harness.sweep_storage import with_retries

        self._process_searchspace_config()
        space, fixed_params, fixed_overrides = create_params_from_overrides(
            self._parse_sweeper_params_config() + list(arguments)
        )
        for name in fixed_params:
            space.pop(name, None)
        if self.sampler_cfg.get("_partial_", False):  # the grid sampler needs the search space
            grid = {name: self._to_grid_sampler_choices(d) for name, d in space.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
        directions = self._get_directions()
        study = self._open_study(directions)
        log.info(
            f"Study {study.study_name} in {self.storage}: {len(study.trials)} trials so far; "
            f"sampler {type(self.sampler).__name__}, pruner {type(study.pruner).__name__}"
        )

        to_go = self.n_trials
        while to_go > 0:
            with_retries(lambda: optuna.storages.fail_stale_trials(study))
            room, running = self._room(study)
            batch_size = min(to_go, self.n_jobs, to_go if room is None else room)
            if batch_size == 0:
                if running and self.heartbeat_interval:  # other workers' trials: wait until done or stale
                    time.sleep(self.heartbeat_interval)
                    continue
                break
            trials: list[optuna.trial.Trial] = []
            try:
                overrides = self._ask_batch(
                    study, batch_size, trials,
                    lambda trial: self._configure_trials([trial], space, fixed_params, fixed_overrides)[0],
                )
                if not trials:
                    continue
                with Heartbeat(study._storage, [t._trial_id for t in trials], self.heartbeat_interval):
                    returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            except BaseException:  # Ctrl-C or a launcher error: leave no trial of this batch RUNNING
                self._fail_running(study, trials)
                raise
            self.job_idx += len(returns)
            failed = [
                ret for trial, ret in zip(trials, returns) if not self._tell(study, trial, ret, len(directions))
            ]
            if len(failed) / len(returns) > self.max_failure_rate:
                log.error(f"{len(failed)} of {len(returns)} jobs failed; max_failure_rate={self.max_failure_rate}")
                for ret in failed:
                    ret.return_value  # re-raises the job's exception with its traceback
            to_go -= len(trials)
        self._save_results(study, directions)

    def _save_results(self, study: optuna.Study, directions: Sequence[str]) -> None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            log.warning("no trial of the study completed")
            return
        if len(directions) == 1:
            best = study.best_trial
            results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
            log.info(f"Best parameters: {best.params}; best value: {best.value}")
        else:
            results = {
                "name": "optuna",
                "solutions": [{"params": t.params, "values": t.values} for t in study.best_trials],
            }
        OmegaConf.save(OmegaConf.create(results), f"{self.config.hydra.sweep.dir}/optimization_results.yaml")


class QLoRAOptunaSweeper(Sweeper):
    """Hydra entry point; the options are those of `QLoRAOptunaSweeperConf`."""

    def __init__(
        self,
        sampler: DictConfig,
        direction: Any,
        storage: Any | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        custom_search_space: str | None,
        params: DictConfig | None,
        pruner: Any = None,
        heartbeat_interval: int | None = None,
        grace_period: int | None = None,
        max_retry: int = 0,
        sqlite_timeout: float = 60.0,
        max_study_trials: int | None = None,
        devices: Any = None,  # read by each job (harness.worker_devices)
        device_lock_dir: str | None = None,
    ) -> None:
        self.sweeper = QLoRAOptunaSweeperImpl(
            sampler,
            direction,
            storage,
            study_name,
            n_trials,
            n_jobs,
            max_failure_rate,
            custom_search_space,
            params,
            pruner=pruner,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            max_retry=max_retry,
            sqlite_timeout=sqlite_timeout,
            max_study_trials=max_study_trials,
        )

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
