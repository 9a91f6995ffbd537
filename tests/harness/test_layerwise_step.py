"""LayerwiseTrainStep (checkpointing by hand, one layer at a time) gives TrainStep's numbers."""

import copy

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from harness.layerwise_step import LayerwiseTrainStep
from harness.training import TrainStep, make_train_step
from tests.harness.tiny_lora import tiny_lora_model


def _model(lora_layers=None, dropout=0.0, checkpointing=True):
    return tiny_lora_model(lora_layers=lora_layers, dropout=dropout, checkpointing=checkpointing)


def _batch(seed, packed=False):
    ids = mx.random.randint(3, 300, (2, 16), key=mx.random.key(seed))
    labels = mx.where(mx.arange(16)[None] < 4, -100, ids)  # a prompt without loss, as the data makes it
    batch = {"input_ids": ids, "labels": labels}
    if packed:  # two sequences per row; 16 tokens > sliding_window=12, so the window matters too
        batch["segment_ids"] = mx.array([[0] * 7 + [1] * 9, [0] * 10 + [1] * 6])
    return batch


def _run(step_class, model, batches_per_step, compile):
    optimizer = optim.AdamW(learning_rate=1e-2)
    step = step_class(model, optimizer, grad_clip=0.5, compile=compile)
    results = []
    for batches in batches_per_step:
        loss, n_tokens, norm = step(batches)
        mx.eval(loss, n_tokens, norm, model.parameters(), optimizer.state)
        results.append((loss.item(), n_tokens.item(), norm.item()))
    return results, dict(tree_flatten(model.trainable_parameters()))


@pytest.mark.parametrize("case", ["plain", "packed", "accumulation", "some_layers", "uncompiled"])
def test_layerwise_step_matches_train_step(case):
    lora_layers = [1, 2] if case == "some_layers" else None
    packed = case == "packed"
    if case == "accumulation":
        schedule = [[_batch(1), _batch(2)], [_batch(3), _batch(4)]]
    else:
        schedule = [[_batch(1, packed)], [_batch(2, packed)], [_batch(3, packed)]]
    compile = case != "uncompiled"
    reference_model = _model(lora_layers)
    layerwise_model = copy.deepcopy(reference_model)
    expected, expected_params = _run(TrainStep, reference_model, schedule, compile)
    got, got_params = _run(LayerwiseTrainStep, layerwise_model, schedule, compile)
    for (loss, n, norm), (loss_ref, n_ref, norm_ref) in zip(got, expected):
        assert n == n_ref
        assert loss == pytest.approx(loss_ref, rel=1e-5)
        assert norm == pytest.approx(norm_ref, rel=1e-4)
    assert got_params.keys() == expected_params.keys()
    for name, value in expected_params.items():
        np.testing.assert_allclose(np.array(got_params[name]), np.array(value), rtol=1e-4, atol=1e-6, err_msg=name)


def test_make_train_step_picks_layerwise_only_where_it_applies():
    optimizer = optim.AdamW(learning_rate=1e-3)
    assert isinstance(make_train_step(_model(), optimizer, grad_clip=1.0), LayerwiseTrainStep)
    assert type(make_train_step(_model(checkpointing=False), optimizer, grad_clip=1.0)) is TrainStep
    # adapter dropout: the recomputation would draw other masks, so mx.checkpoint (which replays them) stays
    assert type(make_train_step(_model(dropout=0.1), optimizer, grad_clip=1.0)) is TrainStep
