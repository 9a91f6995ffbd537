"""The training loop, written to be read top to bottom.

It receives built objects (model with LoRA applied, optimizer, its train and eval steps from `harness.step`,
batch sources, tracker, run directory) and a few plain numbers, never the Hydra config, so tests drive it
without Hydra.
One optimizer step = `grad_accum_steps` micro-batches; their gradients are summed over loss tokens and divided by
the total number of loss tokens, so every token weighs the same however the batches are padded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from tqdm.auto import tqdm

from harness import run_state
from harness.run_state import TrainState
from harness.step.run import run_train_step
from harness.distributed import save_on_main_rank, world
from harness.tracking import Tracker
from models.memory import release_cache

Batch = dict[str, mx.array]
# train_step(micro_batches) -> (loss_sum, n_tokens, grad_norm); eval_step(batch) -> (loss_sum, n_tokens)
# (`harness.step.factory`).
TrainStepFn = Callable[[list[Batch]], tuple[mx.array, mx.array, mx.array]]
EvalStepFn = Callable[[Batch], tuple[mx.array, mx.array]]
# Under a distributed launcher, rank 0 writes the checkpoints, after checking every rank holds the same adapters.
save_checkpoint = save_on_main_rank(run_state.save_checkpoint)


@dataclass
class LoopSettings:
    max_steps: int  # optimizer steps in the whole run
    grad_accum_steps: int = 1
    eval_every: int = 50  # optimizer steps; 0 = only at the end
    log_every: int = 10
    save_every: int = 0  # optimizer steps; 0 = whenever validation runs
    stop_after_steps: int | None = None  # stop this process after so many steps (resume continues)
    progress: bool = True
    seed: int = 0  # dropout randomness of step k comes from (seed, k), so a resumed run draws the same


@dataclass
class TrainResult:
    best_val_loss: float  # nan if the run diverged before any validation
    best_step: int | None
    final_val_loss: float
    first_val_loss: float | None  # before any training (step 0), when this process started at step 0
    steps: int
    diverged: bool
    stopped_early: bool  # stop_after_steps reached; the run can be resumed
    tokens_per_second: float  # non-padding tokens per second of training steps, compilation excluded
    peak_memory_gb: float
    wall_seconds: float
    last_step: int = 0  # the run's optimizer step when this process stopped
    pruned: bool = False  # `on_validation` asked to stop (an Optuna pruner): the run ended before max_steps


def evaluate(
    model: nn.Module, batches: Iterable[Batch], eval_step, *, progress: bool = False
) -> tuple[float, int]:
    """Token-weighted mean loss (nats per token) over `batches`, and the number of loss tokens (under a
    distributed launcher each rank scores its own rows of every batch and the sums are summed over ranks)."""
    was_training = model.training
    model.eval()
    ranks = world()

    def local_sums() -> tuple[mx.array, mx.array]:
        total_loss, total_tokens = mx.array(0.0), mx.array(0)
        for batch in tqdm(batches, desc="validate", unit="batch", leave=False, disable=not progress):
            loss_sum, n_tokens = eval_step(ranks.rows(batch))
            total_loss, total_tokens = total_loss + loss_sum, total_tokens + n_tokens
            mx.eval(total_loss, total_tokens)
        return total_loss, total_tokens

    total_loss, total_tokens = ranks.sum_outputs(local_sums)
    model.train(was_training)
    n = int(total_tokens.item())
    return (float(total_loss.item()) / n if n else float("nan")), n


def micro_batches(train_batches: Callable[[int, int], Iterable[Batch]], state: TrainState) -> Iterator[Batch]:
    """Endless stream of training batches from `state.epoch`/`state.batch_in_epoch` on, updating them as it goes.

    `train_batches(epoch, start_batch)` gives the batches of `epoch` from index `start_batch` on, the same ones
    in the same order every time (seeded shuffle): that makes `state.batch_in_epoch` a resumable data position.
    """
    while True:
        for batch in train_batches(state.epoch, state.batch_in_epoch):
            state.batch_in_epoch += 1
            yield batch
        if state.batch_in_epoch == 0:
            raise ValueError("the training split yields no batches (is it empty?)")
        state.epoch += 1
        state.batch_in_epoch = 0


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9


def train_loop(
    model: nn.Module,
    optimizer: optim.Optimizer,
    train_step: TrainStepFn,
    eval_step: EvalStepFn,
    train_batches: Callable[[int, int], Iterable[Batch]],
    validation_batches: Callable[[], Iterable[Batch]],
    tracker: Tracker,
    run_dir: Path,
    settings: LoopSettings,
    *,
    save_adapters: Callable[[nn.Module, Path], None],
    state: TrainState | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_validation: Callable[[int, float], bool] | None = None,
) -> TrainResult:
    """Train until `settings.max_steps` optimizer steps, validating and checkpointing on the way.

    `train_step` and `eval_step` are built for `model` and `optimizer` (`harness.step.factory`); the loop only calls
    them, so any step with their signatures can be trained with.

    `state` continues a resumed run (weights and optimizer already restored). Returns the best validation loss
    (nan when the loss diverged, which stops training early after saving the state). `should_stop()` is asked
    between steps (`harness.signals`): when true, the loop checkpoints and returns with `stopped_early`.
    `on_validation(step, val_loss) -> stop` is called after each validation during training (not the one before
    the first step); returning True ends the run there (`TrainResult.pruned`), e.g. an Optuna pruner's verdict.
    """
    state = state or TrainState()
    run_dir = Path(run_dir)
    model.train()
    world().start_together(model, state.step)  # under a distributed launcher: rank 0's adapters, one step
    stream = micro_batches(train_batches, state)

    def validate_and_checkpoint() -> float:
        val_loss, val_tokens = evaluate(model, validation_batches(), eval_step, progress=settings.progress)
        release_cache()  # validation's buffers (other shapes than training's) would only sit in MLX's cache
        is_best = math.isfinite(val_loss) and (state.best_val_loss is None or val_loss < state.best_val_loss)
        if is_best:
            state.best_val_loss, state.best_step = val_loss, state.step
        tracker.log(
            {"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 700)), "val/tokens": val_tokens},
            step=state.step,
        )
        save_checkpoint(run_dir, model, optimizer, state, save_adapters, is_best=is_best)
        return val_loss

    first_val_loss = validate_and_checkpoint() if state.step == 0 else None
    final_val_loss = first_val_loss if first_val_loss is not None else float("nan")
    steps_at_start, steps_this_process = state.step, 0
    # Tokens/s counts batch assembly + the step, not validation or checkpoint time.
    window_loss, window_tokens, window_input_tokens, window_seconds = 0.0, 0, 0, 0.0
    total_input_tokens, train_seconds = 0, 0.0
    diverged = stopped_early = pruned = False
    progress = tqdm(
        total=settings.max_steps,
        initial=state.step,
        desc="train",
        unit="step",
        disable=not settings.progress,
        dynamic_ncols=True,
    )
    wall_start = time.perf_counter()

    while state.step < settings.max_steps:
        if should_stop is not None and should_stop():  # a stop asked for between steps: keep the work done
            save_checkpoint(run_dir, model, optimizer, state, save_adapters, is_best=False)
            stopped_early = True
            break
        # 1. One optimizer step over `grad_accum_steps` micro-batches.
        step_start = time.perf_counter()
        batches = [next(stream) for _ in range(settings.grad_accum_steps)]
        mx.random.seed(settings.seed * 1_000_003 + state.step)
        loss_sum, n_tokens, grad_norm = run_train_step(train_step, batches)
        step_seconds = time.perf_counter() - step_start
        window_seconds += step_seconds
        state.step += 1
        steps_this_process += 1
        loss, tokens = float(loss_sum.item()), int(n_tokens.item())
        input_tokens = sum(int(b["attention_mask"].sum().item()) for b in batches)
        state.tokens_seen += tokens
        window_loss, window_tokens = window_loss + loss, window_tokens + tokens
        window_input_tokens += input_tokens
        if steps_this_process > 1:  # the first step of a process includes compilation
            total_input_tokens += input_tokens
            train_seconds += step_seconds

        # 2. A diverging run stops here, with its state saved and the failure logged.
        if not math.isfinite(loss):
            diverged = state.diverged = True
            tracker.log({"train/loss": loss, "train/diverged": 1}, step=state.step)
            save_checkpoint(run_dir, model, optimizer, state, save_adapters, is_best=False)
            progress.write(f"step {state.step}: training loss is {loss}; stopping (diverged)")
            break

        # 3. Logging.
        if state.step % settings.log_every == 0 or state.step == settings.max_steps:
            mean_loss = window_loss / max(window_tokens, 1)
            tokens_per_second = window_input_tokens / window_seconds if window_seconds > 0 else 0.0
            tracker.log(
                {
                    "train/loss": mean_loss,
                    "train/lr": float(optimizer.learning_rate.item()),
                    "train/grad_norm": float(grad_norm.item()),
                    "train/tokens_per_second": tokens_per_second,
                    "train/peak_memory_gb": peak_memory_gb(),
                    "train/epoch": state.epoch,
                },
                step=state.step,
            )
            progress.set_postfix(
                loss=f"{mean_loss:.3f}", tok_s=f"{tokens_per_second:.0f}", mem=f"{peak_memory_gb():.2f}GB"
            )
            window_loss, window_tokens, window_input_tokens, window_seconds = 0.0, 0, 0, 0.0
        progress.update(1)

        # 4. Validation and checkpoints.
        last = state.step == settings.max_steps
        if last or (settings.eval_every and state.step % settings.eval_every == 0):
            final_val_loss = validate_and_checkpoint()
            progress.set_postfix(val_loss=f"{final_val_loss:.3f}")
            if on_validation is not None and not last and on_validation(state.step, final_val_loss):
                pruned = True
                progress.write(f"step {state.step}: stopping (pruned)")
                break
        elif settings.save_every and state.step % settings.save_every == 0:
            save_checkpoint(run_dir, model, optimizer, state, save_adapters, is_best=False)

        # 5. A deliberate stop (for interrupted/resumed runs): checkpoint and leave.
        if (
            settings.stop_after_steps is not None
            and steps_this_process >= settings.stop_after_steps
            and not last
        ):
            if not (settings.eval_every and state.step % settings.eval_every == 0):
                save_checkpoint(run_dir, model, optimizer, state, save_adapters, is_best=False)
            stopped_early = True
            break

    progress.close()
    if state.step >= settings.max_steps and not diverged:
        state.finished = True
        save_checkpoint(run_dir, model, optimizer, state, save_adapters, is_best=False)
    best = float("nan") if diverged or state.best_val_loss is None else state.best_val_loss
    return TrainResult(
        best_val_loss=best,
        best_step=state.best_step,
        final_val_loss=final_val_loss,
        first_val_loss=first_val_loss,
        steps=state.step - steps_at_start,
        diverged=diverged,
        stopped_early=stopped_early,
        tokens_per_second=total_input_tokens / train_seconds if train_seconds > 0 else 0.0,
        peak_memory_gb=peak_memory_gb(),
        wall_seconds=time.perf_counter() - wall_start,
        last_step=state.step,
        pruned=pruned,
    )
