"""The loop draws and builds the next step while the device runs the current one (`harness.step.ahead`): the same
training as one step at a time, never ahead of a validation or checkpoint, and a stop, a divergence or bad data
keeps the data position of the steps done."""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from harness.loop import LoopSettings, train_loop
from harness.run_state import TrainState, read_state
from harness.step.standard import TrainStep
from harness.tracking import Tracker
from tests.harness.tiny_lora import tiny_lora_model

BATCHES = 12  # micro-batches in an epoch


def _batch(index):
    ids = mx.random.randint(3, 300, (2, 16), key=mx.random.key(100 + index))
    return {"input_ids": ids, "labels": ids, "attention_mask": mx.ones_like(ids)}


def train_batches(epoch, start):
    for index in range(start, BATCHES):
        yield _batch(epoch * BATCHES + index)


def save_adapters(model, out_dir):
    mx.save_safetensors(str(out_dir / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))


class Recorder(Tracker):
    """Metrics as the loop logs them, with the order of steps built (`prepare`) and steps logged in `events`."""

    def __init__(self, run_dir, events):
        super().__init__(run_dir, wandb=None, config={})
        self.events = events

    def log(self, metrics, *, step):
        super().log(metrics, step=step)
        if "train/loss" in metrics:
            self.events.append(("logged", step))


class Built:
    """A step whose `prepare` calls are recorded: ("built", how many steps were built before it)."""

    def __init__(self, step, events, nan_at=None):
        self.step, self.events, self.nan_at, self.built = step, events, nan_at, 0

    def __call__(self, batches):
        return self.prepare(batches)()

    def prepare(self, batches):
        index, launch = self.built, self.step.prepare(batches)
        self.events.append(("built", index))
        self.built += 1
        if index != self.nan_at:
            return launch
        return lambda: (mx.array(float("nan")),) + tuple(launch()[1:])


def run(tmp_path, train_step, *, settings, should_stop=None):
    """`train_loop` on the tiny model from a fresh state; returns the state, the events and the adapters."""
    events = []
    model = tiny_lora_model(num_layers=2, dropout=0.1)  # dropout: steps drawn ahead must be seeded as in turn
    optimizer = optim.AdamW(learning_rate=1e-2)
    step = TrainStep(model, optimizer, grad_clip=1.0)
    wrapped = train_step(step, events)
    state = TrainState()
    validation = [_batch(1000)]
    train_loop(model, optimizer, wrapped, lambda batch: (mx.array(1.0), mx.array(1)), train_batches,
               lambda: validation, Recorder(tmp_path, events), tmp_path, settings, save_adapters=save_adapters,
               state=state, should_stop=should_stop)
    return state, events, {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def settings(**overrides):
    return LoopSettings(**{"max_steps": 7, "grad_accum_steps": 2, "eval_every": 4, "log_every": 1,
                           "progress": False, "seed": 3, **overrides})


def test_steps_built_ahead_train_as_one_step_at_a_time(tmp_path):
    _, events, ahead = run(tmp_path / "ahead", lambda step, events: Built(step, events), settings=settings())
    # Built ahead: step k+1 before step k is logged, except after step 4 (validation and a checkpoint follow)
    # and after the last.
    assert events[:4] == [("built", 0), ("built", 1), ("logged", 1), ("built", 2)], events
    after_four = events.index(("logged", 4))
    assert events[after_four - 1:after_four + 3] == [("logged", 3), ("logged", 4), ("built", 4), ("built", 5)]
    assert events[-3:] == [("built", 6), ("logged", 6), ("logged", 7)], events
    # A step without `prepare` runs whole, in its turn: the same adapters (same batches, dropout, updates).
    _, _, in_turn = run(tmp_path / "in_turn", lambda step, events: (lambda batches: step(batches)),
                        settings=settings())
    assert ahead.keys() == in_turn.keys()
    for key in ahead:
        np.testing.assert_array_equal(ahead[key], in_turn[key], err_msg=key)


def test_a_stop_between_steps_keeps_the_data_position_of_the_steps_done(tmp_path):
    stops = iter([False, False, False, True])  # asked before steps 1-4: stop after 3, with step 4 built ahead
    state, events, _ = run(tmp_path, lambda step, events: Built(step, events), settings=settings(),
                           should_stop=lambda: next(stops))
    assert ("built", 3) in events  # drawn ahead, then put back
    saved = read_state(tmp_path)
    assert saved.step == 3 and (saved.epoch, saved.batch_in_epoch) == (0, 3 * 2)


def test_a_diverged_step_keeps_the_data_position_of_the_steps_done(tmp_path):
    state, events, _ = run(tmp_path, lambda step, events: Built(step, events, nan_at=2), settings=settings())
    assert ("built", 3) in events  # step 4 was drawn ahead while the diverging step 3 ran
    saved = read_state(tmp_path)
    assert saved.diverged and saved.step == 3 and saved.batch_in_epoch == 3 * 2


def test_bad_data_met_ahead_is_raised_in_its_turn(tmp_path):
    def failing(epoch, start):
        for index, batch in enumerate(train_batches(epoch, start), start):
            if index == 5:  # step 3's second micro-batch
                raise ValueError("train.jsonl, line 6: not JSON")
            yield batch

    events = []
    model = tiny_lora_model(num_layers=2)
    optimizer = optim.AdamW(learning_rate=1e-2)
    with pytest.raises(ValueError, match="line 6"):
        train_loop(model, optimizer, Built(TrainStep(model, optimizer, grad_clip=1.0), events),
                   lambda batch: (mx.array(1.0), mx.array(1)), failing, lambda: [_batch(1000)],
                   Recorder(tmp_path, events), tmp_path, settings(), save_adapters=save_adapters,
                   state=TrainState())
    # Step 2's results were kept before the error: it surfaced when step 3 was drawn in its turn.
    assert ("logged", 2) in events and ("logged", 3) not in events
