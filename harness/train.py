"""Train LoRA adapters on a (quantized) Mistral: `python -m harness.train [overrides]`, also `qlora-train`.

    python -m harness.train                                      # embedded default: tiny model, Dolly sample
    python -m harness.train lora.rank=16 optim.lr=1e-3            # a single run with overrides
    python -m harness.train -m hparams_search=tiny_optuna         # an Optuna sweep (SQLite study under multirun/)
    python -m harness.train experiment=mistral7b_dolly_qlora      # the real thing
    python -m harness.train resume=outputs/2026-11-26/10-00-00-123456   # continue an interrupted run

`train(cfg)` returns the best validation loss (nan when the run diverged), the value the Optuna sweeper minimizes.
"""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import harness.schema  # noqa: F401  (registers the structured configs)
from harness import build
from harness.cli import CONFIG_DIR, TRUSTED_TARGETS
from harness.checkpoints import RUN_CONFIG_FILE, STATE_FILE, load_checkpoint
from harness.command_outcome import exit_if_diverged, hydra_task, run_command
from harness.config_checks import check_train_config
from harness.console import note
from harness.distributed import SilentTracker, hydra_argv, world
from harness.launch import JOB_ENV, starts_ranks, train_on_ranks
from harness.process import set_up_process
from harness.data.report import skipped_records_line
from harness.pruning import reporter_for_job
from harness.resume import RunDirLock, plan_run, resume_target
from harness.step.factory import make_eval_step, make_train_step
from harness.signals import RunInterrupted, StopSignals, signal_name
from harness.tracking import Tracker
from harness.before_after import metrics as before_after_metrics
from harness.training import LoopSettings, TrainResult, train_loop
from harness.worker_devices import claim_worker_device
from models.adapters import save_adapters
from models.atomic_files import atomic_write_text
from models.backend import describe
from models.lora import trainable_parameter_count
from models.quant import model_bits_per_weight

JOB_FILE = "job.json"  # the Hydra job: overrides, sweep study and storage (read by harness.compare)


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
    """`train` once the run directory is locked and the config decided."""
    from harness.data import batch_iterator, batching_options, num_batches, validation_batches

    trainer = cfg.trainer
    claim_worker_device(sweeper_config())
    build.seed_everything(trainer.seed)
    ranks = world()
    # Before anything is evaluated: memory policy, and the CPU streams' plan, which may set MLX's evaluation order
    # (read once by MLX; harness/step/cpu_streams.py). Each rank has its share of a batch's rows.
    cpu_streams, _ = set_up_process(trainer, batch_size=-(-trainer.batch_size // ranks.size))

    tokenizer, data = prepare_data(cfg)
    validation = data.validation
    if trainer.max_eval_examples is not None:
        validation = validation[: trainer.max_eval_examples]
    data_cfg = cfg.data

    def train_batches(epoch: int, start_batch: int = 0):
        return batch_iterator(
            data.train,
            trainer.batch_size,
            seed=trainer.seed,
            epoch=epoch,
            shuffle=True,
            start_batch=start_batch,
            pad_id=tokenizer.pad_id,
            **batching_options(data_cfg),
        )

    def val_batches():
        return validation_batches(
            validation,
            trainer.eval_batch_size,
            pad_id=tokenizer.pad_id,
            pad_to_multiple=data_cfg.pad_to_multiple,
            max_seq_len=data_cfg.val_max_seq_len or data_cfg.max_seq_len,
        )

    batches_per_epoch = num_batches(
        data.train,
        trainer.batch_size,
        seed=trainer.seed,
        pack=data_cfg.pack,
        max_seq_len=data_cfg.max_seq_len,
        sort_chunk_batches=data_cfg.sort_chunk_batches,
    )
    total_steps = build.total_optimizer_steps(trainer, cfg.optim, batches_per_epoch)
    model = build.build_model(cfg, progress=trainer.progress)
    build.check_tokenizer_fits(tokenizer, model)
    optimizer = build.build_optimizer(cfg.optim, model, total_steps)
    spec = build.lora_spec(cfg.lora)
    base_id = build.base_model_id(cfg.model)

    def save(model, out_dir):
        save_adapters(model, out_dir, spec, base_model=base_id)

    state = None
    if continuing and (run_dir / STATE_FILE).exists():
        state = load_checkpoint(run_dir, model, optimizer)  # checks everything; writes nothing
        state.finished = state.finished and state.step >= total_steps  # a run extended with trainer.max_steps
        note(f"resuming {run_dir} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    elif continuing:
        note(f"resume: {run_dir} has no checkpoint yet; starting from step 0")
    # Only now, with everything to load checked, is the run directory written (by rank 0 alone).
    if ranks.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / RUN_CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    if ranks.is_main and (not continuing or not (run_dir / JOB_FILE).exists()):  # a resume keeps its job
        atomic_write_text(
            run_dir / JOB_FILE, json.dumps({k: v for k, v in job.items() if k != "run_dir"}, indent=2)
        )
    if len(validation) == 0:
        note(
            "warning: the validation split is empty (data.val_fraction, data.max_records?): no validation loss, "
            "no best checkpoint, and the objective is nan"
        )

    wandb_cfg = build.plain(cfg.logger.wandb) if cfg.logger.wandb is not None else None
    config = {**OmegaConf.to_container(cfg, resolve=True), "backend": describe()}
    tracker = (Tracker if ranks.is_main else SilentTracker)(
        run_dir,
        wandb=wandb_cfg,
        config=config,
        name=job["name"] or cfg.experiment_name,
        group=job["study"],
        resume_step=None if state is None else state.step,
    )
    result: TrainResult | None = None
    try:
        trainable = trainable_parameter_count(model)
        storage = model_bits_per_weight(model)
        tracker.log(
            {
                "model/trainable_parameters": trainable,
                "model/bits_per_weight": storage["model_bits_per_weight"],
                "model/bytes": storage["total_bytes"],
                **(
                    {"model/quantized_bits_per_weight": storage["quantized_bits_per_weight"]}
                    if math.isfinite(storage["quantized_bits_per_weight"])
                    else {}
                ),
                "data/train_examples": len(data.train),
                "data/validation_examples": len(validation),
                "train/total_steps": total_steps,
            },
            step=0 if state is None else state.step,
        )
        want_answers = ranks.is_main and (  # generation is rank 0's
            cfg.trainer.num_sample_prompts > 0 or cfg.trainer.exact_match_examples != 0
        )
        before = None
        if want_answers:
            from harness.before_after import BEFORE_FILE, AnswerSheet

            before = AnswerSheet.load(run_dir / BEFORE_FILE)
            if before is None and state is None:  # fresh adapters are the identity: this is the base model
                before = answers(model, tokenizer, validation, cfg, desc="answers before training")
                before.save(run_dir / BEFORE_FILE)
                tracker.log(before_after_metrics(before, "base"), step=0)
        settings = LoopSettings(
            max_steps=total_steps,
            grad_accum_steps=cfg.optim.grad_accum_steps,
            eval_every=trainer.eval_every,
            log_every=trainer.log_every,
            save_every=trainer.save_every,
            stop_after_steps=trainer.stop_after_steps,
            progress=trainer.progress,
            seed=trainer.seed,
        )
        train_step = make_train_step(
            model, optimizer, grad_clip=cfg.optim.grad_clip, compile=trainer.compile, streams=cpu_streams
        )
        eval_step = make_eval_step(model, compile=trainer.compile, streams=cpu_streams)
        stop.armed = True
        result = train_loop(
            model,
            optimizer,
            train_step,
            eval_step,
            train_batches,
            val_batches,
            tracker,
            run_dir,
            settings,
            save_adapters=save,
            state=state,
            should_stop=ranks.agreed(stop.requested),
            # A trial of the project's sweeper reports to Optuna (a distributed trial's ranks have no sweeper).
            on_validation=reporter_for_job(sweeper_config()),
        )
        stop.armed = False
        if not result.diverged and not result.stopped_early and not result.pruned and want_answers:
            after = answers(model, tokenizer, validation, cfg, desc="answers after training")
            log_answers(before, after, tracker, run_dir, step=total_steps)
        tracker.summary(
            {
                "best_val_loss": result.best_val_loss,
                "best_step": result.best_step,
                "final_val_loss": result.final_val_loss,
                "first_val_loss": result.first_val_loss,
                "diverged": result.diverged,
                "pruned": result.pruned,
                "steps": result.steps,
                "tokens_per_second": result.tokens_per_second,
                "peak_memory_gb": result.peak_memory_gb,
                "trainable_parameters": trainable,
                "wall_seconds": result.wall_seconds,
            }
        )
        if ranks.is_main:
            print_summary(run_dir, result, trainable, storage, tracker)
        skipped = skipped_records_line(data.stats)
        if skipped:
            note(skipped)
    finally:
        stopped = stop.received is not None and result is not None and result.stopped_early
        tracker.finish(exit_code=0 if result is not None and not result.diverged and not stopped else 1)
    if stop.received is not None and result.stopped_early:
        name = signal_name(stop.received)
        raise RunInterrupted(
            stop.received,
            f"{name}: stopped at step {result.last_step} with a checkpoint in {run_dir}\n"
            f"to continue: python -m harness.train resume={run_dir}",
        )
    return result.best_val_loss


def validation_records(validation) -> list[dict]:
    """The raw records (instruction, context, response, category) of the validation examples, in order."""
    if hasattr(validation, "records"):
        return list(validation.records)
    return [example["record"] for example in validation]


def answers(model, tokenizer, validation, cfg: DictConfig, *, desc: str):
    """The model's greedy answers to the fixed validation prompts and the exact-match records (`harness.before_after`)."""
    from harness import before_after, exact_match

    records = validation_records(validation)
    return before_after.answer_sheet(
        model,
        tokenizer,
        before_after.showcase_records(records, cfg.trainer.num_sample_prompts),
        exact_match.checkable(records, cfg.trainer.exact_match_examples),
        template=cfg.data.template,
        max_new_tokens=cfg.trainer.sample_max_new_tokens,
        progress=cfg.trainer.progress,
        desc=desc,
    )


def log_answers(before, after, tracker: Tracker, run_dir: Path, *, step: int) -> None:
    """The answers after training (beside those before) in the log, W&B (metrics + a table) and the run dir."""
    from harness import before_after

    after.save(run_dir / before_after.AFTER_FILE)
    tracker.log(before_after.metrics(after, "eval"), step=step)
    rows = [
        [row["instruction"], row["context"], row["reference"],
         before.shown[i]["response"] if before is not None and i < len(before.shown) else "", row["response"]]
        for i, row in enumerate(after.shown)
    ]
    tracker.log_table("generations", ["instruction", "context", "reference", "before", "after"], rows, step=step)
    note(before_after.format_report(before, after))


def print_summary(
    run_dir: Path, result: TrainResult, trainable: int, storage: dict[str, float], tracker: Tracker
) -> None:
    status = (
        "DIVERGED (nan/inf loss)"
        if result.diverged
        else "pruned (the Optuna pruner stopped it)"
        if result.pruned
        else ("stopped early (resume to continue)" if result.stopped_early else "finished")
    )
    best = "n/a" if math.isnan(result.best_val_loss) else f"{result.best_val_loss:.4f}"
    first = "n/a" if result.first_val_loss is None else f"{result.first_val_loss:.4f}"
    lines = [
        f"run            {status}",
        f"val loss       first {first}   best {best} (step {result.best_step})   final {result.final_val_loss:.4f}",
        f"perplexity     best {math.exp(min(result.best_val_loss, 700)):.2f}"
        if not math.isnan(result.best_val_loss)
        else "perplexity     n/a",
        f"steps          {result.steps} in {result.wall_seconds:.1f} s, {result.tokens_per_second:.0f} tokens/s",
        f"memory         peak {result.peak_memory_gb:.2f} GB   trainable parameters {trainable:,}",
        f"base model     {storage['total_bytes'] / 1e9:.3f} GB, {storage['model_bits_per_weight']:.2f} bits/weight"
        + (
            f" ({storage['quantized_bits_per_weight']:.3f} in quantized linears)"
            if math.isfinite(storage["quantized_bits_per_weight"])
            else " (not quantized)"
        ),
        f"run dir        {run_dir}",
        f"metrics        {tracker.metrics_path}",
    ]
    if tracker.wandb_dir is not None:
        lines.append(f"wandb          {tracker.wandb_dir}  (wandb sync to upload)")
    note("\n".join(lines))


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
