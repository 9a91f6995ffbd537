"""The training loop, written to be read top to bottom.

It receives built objects (model with LoRA applied, optimizer, batch sources, tracker, run directory) and a few
plain numbers, never the Hydra config, so tests and `harness.bench` drive it without Hydra.
One optimizer step = `grad_accum_steps` micro-batches; their gradients are summed over loss tokens and divided by
the total number of loss tokens, so every token weighs the same however the batches are padded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_map
from tqdm.auto import tqdm

from harness import checkpoints
from harness.checkpoints import TrainState
from harness.cpu_streams import new_streams, split_rows
from harness.distributed import save_on_main_rank, world
from harness.loss import causal_lm_loss
from harness.tracking import Tracker
from models.memory import release_cache

Batch = dict[str, mx.array]
# Under a distributed launcher, rank 0 writes the checkpoints, after checking every rank holds the same adapters.
save_checkpoint = save_on_main_rank(checkpoints.save_checkpoint)


@dataclass
class LoopSettings:
    max_steps: int  # optimizer steps in the whole run
    grad_accum_steps: int = 1
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    eval_every: int = 50  # optimizer steps; 0 = only at the end
    log_every: int = 10
    save_every: int = 0  # optimizer steps; 0 = whenever validation runs
    stop_after_steps: int | None = None  # stop this process after so many steps (resume continues)
    compile: bool = True
    cpu_streams: int = 1  # streams sharing each micro-batch's rows (`harness.cpu_streams`)
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


class TrainStep:
    """One optimizer step over a list of micro-batches: `step(batches) -> (loss_sum, n_tokens, grad_norm)`.

    Compiled with the model's and optimizer's state (and the RNG, for dropout) as implicit inputs and outputs,
    as MLX's docs describe. Gradients and the update are two compiled graphs, and the gradients are scheduled
    (`mx.async_eval`) before the update is built: in one graph, with gradient clipping (the update waits for the
    norm of all gradients), MLX kept part of every layer's backward pass alive until the end of the step; with
    checkpointing that grew the step's memory by a few activations per layer (tests/harness/test_train_step_memory.py).
    `streams > 1` splits each micro-batch's rows over that many streams (`harness.cpu_streams`).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer,
        *,
        grad_clip: float,
        compile: bool = True,
        streams: int = 1,
    ):
        self.model = model
        self.optimizer = optimizer
        loss_and_grad = nn.value_and_grad(model, causal_lm_loss)

        def gradients(batch: Batch):
            (loss_sum, n_tokens), grads = loss_and_grad(model, batch)
            return loss_sum, n_tokens, grads

        self.streams = new_streams(streams)
        gradients = rows_on_streams(gradients, self.streams)
        if compile:
            state = [model.state, optimizer.state, mx.random.state]
            gradients = partial(mx.compile, inputs=state, outputs=state)(gradients)
        self._gradients, self._update = gradients, make_update(model, optimizer, grad_clip, compile)

    def __call__(self, batches: list[Batch]) -> tuple[mx.array, mx.array, mx.array]:
        loss_sum, n_tokens, grads = accumulate_gradients(self._gradients, batches)
        mx.async_eval(loss_sum, n_tokens, grads)
        return loss_sum, n_tokens, self._update(grads, n_tokens)


def accumulate_gradients(
    gradients: Callable[[Batch], tuple], batches: list[Batch]
) -> tuple[mx.array, mx.array, dict]:
    """Summed `(loss_sum, n_tokens, grads)` of `gradients(batch)` over the micro-batches of one step.

    Under a distributed launcher each rank takes its own rows of every batch, and the sums are summed over
    ranks (`harness.distributed`)."""
    ranks = world()
    return ranks.sum_outputs(lambda: sum_outputs([gradients(ranks.rows(batch)) for batch in batches]))


def sum_outputs(outputs: list[Any]) -> Any:
    """Element-wise sum, in order, of equally shaped trees of arrays (e.g. `(loss_sum, n_tokens, grads)`)."""
    return tree_map(lambda *parts: sum(parts[1:], parts[0]), *outputs)


def rows_on_streams(fn: Callable[[Batch], Any], streams: list[mx.Stream]) -> Callable[[Batch], Any]:
    """`fn(batch)`, whose outputs add up over rows (loss sums, token counts, gradients), with each batch's rows
    split over `streams`, one piece each, and the pieces' outputs summed (`harness.cpu_streams`). No streams:
    `fn` itself."""
    if not streams:
        return fn

    def split_fn(batch: Batch):
        outputs = []
        for stream, piece in zip(streams, split_rows(batch, len(streams))):
            with mx.stream(stream):
                outputs.append(fn(piece))
        return sum_outputs(outputs)

    return split_fn


def make_update(model: nn.Module, optimizer: optim.Optimizer, grad_clip: float, compile: bool = True):
    """`update(grads, n_tokens) -> grad_norm`: divide summed gradients by the loss tokens, clip their global norm
    to `grad_clip` (0 = off), apply the optimizer to `model`. Compiled with the model and optimizer state."""

    def update(grads: dict, n_tokens: mx.array) -> mx.array:
        grads = tree_map(lambda g: g / mx.maximum(n_tokens, 1).astype(g.dtype), grads)
        if grad_clip > 0:
            grads, norm = optim.clip_grad_norm(grads, grad_clip)
        else:
            norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for g in _leaves(grads)))
        optimizer.update(model, grads)
        return norm

    if compile:
        state = [model.state, optimizer.state, mx.random.state]
        update = partial(mx.compile, inputs=state, outputs=state)(update)
    return update


def make_train_step(
    model: nn.Module, optimizer: optim.Optimizer, *, grad_clip: float, compile: bool = True, streams: int = 1
):
    """The training step for `model`: `LayerwiseTrainStep` (memory-bounded: layer by layer, micro-batch by
    micro-batch) when it has gradient checkpointing on, else `TrainStep` with each micro-batch's rows split over
    `streams` streams (`harness.cpu_streams.plan_cpu_streams` chooses how many)."""
    from harness.layerwise_step import LayerwiseTrainStep

    if LayerwiseTrainStep.supports(model):
        return LayerwiseTrainStep(model, optimizer, grad_clip=grad_clip, compile=compile)
    return TrainStep(model, optimizer, grad_clip=grad_clip, compile=compile, streams=streams)


def _leaves(tree: Any) -> Iterator[mx.array]:
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree


def make_eval_step(
    model: nn.Module, compile: bool = True, streams: int = 1
) -> Callable[[Batch], tuple[mx.array, mx.array]]:
    """`eval_step(batch) -> (loss_sum, n_tokens)` with the current weights (model state is an input), each
    batch's rows split over `streams` streams as in `TrainStep`."""
    step = rows_on_streams(partial(causal_lm_loss, model), new_streams(streams))
    return mx.compile(step, inputs=[model.state]) if compile else step


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
    train_step = make_train_step(
        model, optimizer, grad_clip=settings.grad_clip, compile=settings.compile, streams=settings.cpu_streams
    )
    eval_step = make_eval_step(model, compile=settings.compile, streams=settings.cpu_streams)
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
        loss_sum, n_tokens, grad_norm = train_step(batches)
        mx.eval(loss_sum, n_tokens, grad_norm)
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
