"""What a training run tells its reader: the model's facts at the start, answers before and after training,
the end-of-run summary (log, W&B summary, console)."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from harness.console import note
from harness.data.report import skipped_records_line
from harness.distributed import world
from harness.tracking import Tracker
from harness.loop import TrainResult
from models.lora import trainable_parameter_count
from models.quant import model_bits_per_weight


def warn_if_no_validation(validation) -> None:
    if len(validation) == 0:
        note(
            "warning: the validation split is empty (data.val_fraction, data.max_records?): no validation loss, "
            "no best checkpoint, and the objective is nan"
        )


def log_run_facts(tracker: Tracker, model, data, validation, total_steps: int, state) -> dict:
    """Log the model's size and storage and the data's size at the run's first step (or where it resumes);
    return `{"trainable": ..., "storage": ...}` for the end-of-run summary."""
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
    return {"trainable": trainable, "storage": storage}


def wants_answers(cfg: DictConfig) -> bool:
    """Whether the run records answers before and after training (rank 0's work)."""
    return world().is_main and (cfg.trainer.num_sample_prompts > 0 or cfg.trainer.exact_match_examples != 0)


def answers_before(model, tokenizer, validation, cfg: DictConfig, tracker: Tracker, run_dir: Path, state):
    """The base model's answers (`harness.before_after`): those saved in the run directory, else, on a fresh run,
    computed now (fresh adapters are the identity), saved and logged at step 0. None when none are wanted."""
    if not wants_answers(cfg):
        return None
    from harness.before_after import BEFORE_FILE, AnswerSheet
    from harness.before_after import metrics as before_after_metrics

    before = AnswerSheet.load(run_dir / BEFORE_FILE)
    if before is None and state is None:
        before = answers(model, tokenizer, validation, cfg, desc="answers before training")
        before.save(run_dir / BEFORE_FILE)
        tracker.log(before_after_metrics(before, "base"), step=0)
    return before


def finish_run(result: TrainResult, facts: dict, model, tokenizer, validation, data, cfg: DictConfig,
               tracker: Tracker, run_dir: Path, *, before, total_steps: int) -> None:
    """After the loop: the answers after training (a run that ran to its end), the W&B summary, the console
    summary (rank 0) and the skipped records' line."""
    if not result.diverged and not result.stopped_early and not result.pruned and wants_answers(cfg):
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
            "trainable_parameters": facts["trainable"],
            "wall_seconds": result.wall_seconds,
        }
    )
    if world().is_main:
        print_summary(run_dir, result, facts["trainable"], facts["storage"], tracker)
    skipped = skipped_records_line(data.stats)
    if skipped:
        note(skipped)


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
