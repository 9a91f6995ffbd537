"""`harness.step.run.run_train_step` evaluates only the loss, tokens and norm, as the loop needs them; the update's
parameters and optimizer state are computed when the next step reaches them. The numbers must not change."""

import copy

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from harness.step.layerwise import LayerwiseTrainStep
from harness.step.run import run_train_step
from harness.step.standard import TrainStep
from tests.harness.test_layerwise_step import _batch
from tests.harness.tiny_lora import tiny_lora_model


def _train(step_class, model, deferred: bool):
    optimizer = optim.AdamW(learning_rate=1e-2)
    step = step_class(model, optimizer, grad_clip=0.5)
    seen = []
    for batches in [[_batch(1)], [_batch(2), _batch(3)], [_batch(4)]]:
        if deferred:
            loss, n_tokens, norm = run_train_step(step, batches)
        else:
            loss, n_tokens, norm = step(batches)
            mx.eval(loss, n_tokens, norm, model.parameters(), optimizer.state)
        seen.append((loss.item(), n_tokens.item(), norm.item()))
    state = dict(tree_flatten(optimizer.state))
    return seen, dict(tree_flatten(model.trainable_parameters())), state


@pytest.mark.parametrize("step_class", [TrainStep, LayerwiseTrainStep])
def test_updates_left_to_the_next_step_give_the_numbers_of_updates_evaluated_at_once(step_class):
    evaluated_model = tiny_lora_model(checkpointing=step_class is LayerwiseTrainStep)
    deferred_model = copy.deepcopy(evaluated_model)
    expected, expected_params, expected_state = _train(step_class, evaluated_model, deferred=False)
    got, got_params, got_state = _train(step_class, deferred_model, deferred=True)
    assert got == expected
    assert got_params.keys() == expected_params.keys() and got_state.keys() == expected_state.keys()
    for name, value in [*expected_params.items(), *expected_state.items()]:
        reference = got_params[name] if name in got_params else got_state[name]
        np.testing.assert_array_equal(np.array(reference), np.array(value), err_msg=name)
