"""Train LoRA adapters on a (quantized) Mistral: `python -m harness.train [overrides]`, also `qlora-train`.

    python -m harness.train                                      # embedded default: SmolLM2-135M, Dolly sample
    python -m harness.train lora.rank=16 optim.lr=1e-3            # a single run with overrides
    python -m harness.train -m hparams_search=tiny_optuna         # an Optuna sweep (SQLite study under multirun/)
    python -m harness.train experiment=mistral7b_dolly_qlora      # the real thing
    python -m harness.train resume=outputs/2026-11-26/10-00-00-123456   # continue an interrupted run

`train(cfg)` returns the best validation loss (nan when the run diverged), the value the Optuna sweeper minimizes.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import harness.schema  # noqa: F401  (registers the structured configs)
from harness import build, report
from harness.run_state import TrainState, restore_run_state, write_run_record
from harness.cli import CONFIG_DIR, TRUSTED_TARGETS
from harness.command_outcome import exit_if_diverged, hydra_task, run_command
from harness.config_checks import check_train_config
from harness.console import note
from harness.data.batching import RunBatches
from harness.distributed import SilentTracker, hydra_argv, world
from harness.launch import JOB_ENV, starts_ranks, train_on_ranks
from harness.process import set_up_process
from harness.pruning import reporter_for_job
from harness.resume import RunDirLock, plan_run, resume_target
from harness.signals import RunInterrupted, StopSignals, signal_name
from harness.step.factory import configured_train_step, make_eval_step
from harness.tracking import Tracker
from harness.loop import LoopSettings, TrainResult, train_loop
from harness.worker_devices import claim_worker_device
from models.backend import describe


def hydra_job_info() -> dict[str, str | None]:
    """Run directory, override string and sweep/study name of the current Hydra job (None outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    from harness.pruning import trial_number_from_env

    if not HydraConfig.initialized():
        started_by = json.loads(os.environ.get(JOB_ENV, "{}"))  # a rank of a job `harness.train` started
        return {
            "run_dir": None, "name": None, "study": None, "storage": None, "overrides": [], "trial": None,
            **started_by,
        }
    hc = HydraConfig.get()
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    return {
        "run_dir": hc.runtime.output_dir,
        "name": hc.job.override_dirname or None,
        "study": hc.sweeper.get("study_name") if multirun else None,
        "storage": hc.sweeper.get("storage") if multirun else None,
        "overrides": list(hc.overrides.task),
        "trial": trial_number_from_env() if multirun else None,  # the Optuna trial number (our sweeper)
        "experiment": hc.runtime.choices.get("experiment"),  # chosen by the command or by hparams_search
    }


def sweeper_config():
    """`hydra.sweeper` of the current multirun job, else None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or str(HydraConfig.get().mode) != "RunMode.MULTIRUN":
        return None
    return HydraConfig.get().sweeper


def prepare_data(cfg: DictConfig):
    """Tokenizer and prepared (cached) splits for `cfg.data`."""
    from harness.data import load_tokenizer, prepare_dataset

    tokenizer = load_tokenizer(build.tokenizer_path(cfg))
    data = prepare_dataset(cfg.data, tokenizer, cache_dir=build.data_cache_dir(cfg))
    return tokenizer, data


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> float:
    """Run one experiment described by `cfg`; return its best validation loss (nan if it diverged).

    `run_dir` defaults to Hydra's output directory for this job. With `resume`, the run's saved config is used
    (`harness.resume`). Raises `RunInterrupted` when SIGINT/SIGTERM stopped it (after a checkpoint).
    """
    job = hydra_job_info()
    check_train_config(cfg)  # before any model or data work
    # Before anything touches the GPU (MLX reads CUDA_VISIBLE_DEVICES once, when it first creates a context).
    device = claim_worker_device(sweeper_config())
    if device is not None:
        note(f"sweep worker process {os.getpid()}: device {device} (hydra.sweeper.devices)")
    run_dir = Path(run_dir or job["run_dir"] or cfg.paths.outputs)
    if starts_ranks(cfg):  # `distributed.ranks_per_host` > 1 (or several hosts): the run goes to its ranks
        return train_on_ranks(cfg, run_dir, job)
    ranks = world()  # under a distributed launcher, rank 0 decides the run directory and config, and alone writes
    if ranks.is_main:
        run_dir = resume_target(cfg.resume, run_dir) or run_dir
    run_dir = Path(ranks.broadcast_text(str(run_dir)))
    with RunDirLock(run_dir) if ranks.is_main else nullcontext(), StopSignals(ranks.stop_signals()) as stop:
        plan = ranks.decide_on_main(lambda: plan_run(cfg, run_dir, job["overrides"] if job["run_dir"] else None))
        check_train_config(plan.cfg)
        for line in plan.notes if ranks.is_main else []:
            note(line)
        return run_training(plan.cfg, run_dir, job, continuing=plan.continuing, stop=stop)


def run_training(cfg: DictConfig, run_dir: Path, job: dict, *, continuing: bool, stop: StopSignals) -> float:
    """`train` once the run directory is locked and the config decided: build, restore, train, report."""
    trainer, ranks = cfg.trainer, world()
    build.seed_everything(trainer.seed)
    # Before anything is evaluated: memory policy, and the CPU streams' plan, which may set MLX's evaluation order
    # (read once by MLX; harness/step/cpu_streams.py). Each rank has its share of a batch's rows.
    cpu_streams, _ = set_up_process(trainer, batch_size=-(-trainer.batch_size // ranks.size))

    tokenizer, data = prepare_data(cfg)
    batches = RunBatches(cfg, data, tokenizer.pad_id)
    total_steps = build.total_optimizer_steps(trainer, cfg.optim, batches.per_epoch)
    model = build.build_model(cfg, progress=trainer.progress)
    build.check_tokenizer_fits(tokenizer, model)
    optimizer = build.build_optimizer(cfg.optim, model, total_steps)
    data_source = data.stats["key"]["source"]
    state = restore_run_state(
        run_dir, model, optimizer, continuing=continuing, total_steps=total_steps, data_source=data_source,
        data_description=data.stats["source"],
    )
    if state is not None and state.finished:  # nothing to train: leave the finished run as it is
        if ranks.is_main:
            note(
                f"resume: the run in {run_dir} finished at step {state.step} of {total_steps}; nothing to do "
                f"(to train further: python -m harness.train resume={run_dir} trainer.max_steps=<more steps>)"
            )
        return float("nan") if state.best_val_loss is None else state.best_val_loss
    if ranks.is_main:  # only now, with everything to load checked, is the run directory written (by rank 0)
        write_run_record(run_dir, cfg, {k: v for k, v in job.items() if k != "run_dir"}, continuing=continuing)
    report.warn_if_no_validation(batches.validation)

    tracker = open_tracker(cfg, run_dir, job, resume_step=None if state is None else state.step)
    result: TrainResult | None = None
    try:
        facts = report.log_run_facts(tracker, model, data, batches.validation, total_steps, state)
        before = report.answers_before(model, tokenizer, batches.validation, cfg, tracker, run_dir, state)
        train_step = configured_train_step(model, optimizer, cfg, streams=cpu_streams)
        eval_step = make_eval_step(model, compile=trainer.compile, streams=cpu_streams)
        stop.armed = True
        result = train_loop(
            model,
            optimizer,
            train_step,
            eval_step,
            batches.train,
            batches.validate,
            tracker,
            run_dir,
            loop_settings(cfg, total_steps),
            save_adapters=build.adapter_saver(cfg),
            state=state if state is not None else TrainState(data_source=data_source),
            should_stop=ranks.agreed(stop.requested),
            # A trial of the project's sweeper reports to Optuna (a distributed trial's ranks have no sweeper).
            on_validation=reporter_for_job(sweeper_config()),
        )
        stop.armed = False
        report.finish_run(result, facts, model, tokenizer, batches.validation, data, cfg, tracker, run_dir,
                          before=before, total_steps=total_steps)
    finally:
        stopped = stop.received is not None and result is not None and result.stopped_early
        tracker.finish(exit_code=0 if result is not None and not result.diverged and not stopped else 1)
    if stop.received is not None and result.stopped_early:
        raise RunInterrupted(
            stop.received,
            f"{signal_name(stop.received)}: stopped at step {result.last_step} with a checkpoint in {run_dir}\n"
            f"to continue: python -m harness.train resume={run_dir}",
        )
    return result.best_val_loss


def loop_settings(cfg: DictConfig, total_steps: int) -> LoopSettings:
    """The loop's numbers from the run's config."""
    trainer = cfg.trainer
    return LoopSettings(
        max_steps=total_steps,
        grad_accum_steps=cfg.optim.grad_accum_steps,
        eval_every=trainer.eval_every,
        log_every=trainer.log_every,
        save_every=trainer.save_every,
        stop_after_steps=trainer.stop_after_steps,
        progress=trainer.progress,
        seed=trainer.seed,
    )


def open_tracker(cfg: DictConfig, run_dir: Path, job: dict, *, resume_step: int | None) -> Tracker:
    """The run's metrics log (and W&B run); under a distributed launcher only rank 0 records anything."""
    wandb_cfg = build.plain(cfg.logger.wandb) if cfg.logger.wandb is not None else None
    config = {**OmegaConf.to_container(cfg, resolve=True), "backend": describe()}
    return (Tracker if world().is_main else SilentTracker)(
        run_dir,
        wandb=wandb_cfg,
        config=config,
        name=job["name"] or cfg.experiment_name,
        group=job["study"],
        resume_step=resume_step,
    )


@hydra.main(config_path=CONFIG_DIR, config_name="train", execution_whitelist=TRUSTED_TARGETS)
@hydra_task
def _hydra_main(cfg: DictConfig) -> float:
    objective = train(cfg)
    exit_if_diverged(objective, hydra_job_info()["run_dir"])
    return objective


def main() -> None:
    """Console entry point (`qlora-train`)."""
    sys.argv = hydra_argv(sys.argv)  # under a distributed launcher, ranks other than 0 write no Hydra files
    run_command(_hydra_main)


if __name__ == "__main__":
    main()
