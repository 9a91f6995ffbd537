"""LayerwiseTrainStep (checkpointing by hand, one layer at a time) gives TrainStep's numbers, and with adapter
dropout those of plain autograd under the same masks."""

import copy

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx import nn

from harness.step.layerwise import LayerwiseTrainStep, layer_dropout_keys, micro_batch_dropout_keys
from harness.step.loss import loss_from_hidden
from harness.step.accumulate import make_update, sum_outputs
from harness.step import factory
from harness.step.factory import make_train_step
from harness.step.standard import TrainStep
from models.recompute import uncheckpointed_call
from models.lora import dropout_keys
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
    # atol: the layerwise step updates stacked arrays (`harness.step.stacked`), the norm summed in another order;
    # Adam's steps of lr 1e-2 turn that last-bit difference into about 1e-6 on entries of about 0.1
    for name, value in expected_params.items():
        np.testing.assert_allclose(np.array(got_params[name]), np.array(value), rtol=1e-4, atol=1e-5, err_msg=name)


def test_make_train_step_picks_layerwise_only_where_it_applies(monkeypatch):
    def kind(model, backend="cpu", **options):
        monkeypatch.setattr(factory, "backend_name", lambda: backend)
        return type(make_train_step(model, optim.AdamW(learning_rate=1e-3), grad_clip=1.0, **options))

    assert kind(_model()) is LayerwiseTrainStep  # checkpointing on
    assert kind(_model(dropout=0.1)) is LayerwiseTrainStep
    assert kind(_model(checkpointing=False)) is TrainStep
    assert kind(_model(), kind="standard") is TrainStep
    assert kind(_model(checkpointing=False), kind="layerwise") is LayerwiseTrainStep
    # without checkpointing, "auto" goes layer by layer only for small micro-batches on a backend measured so
    small = factory.LAYERWISE_MAX_TOKENS["cuda"]
    assert kind(_model(checkpointing=False), "cuda", micro_batch_tokens=small) is LayerwiseTrainStep
    assert kind(_model(checkpointing=False), "cuda", micro_batch_tokens=small + 1) is TrainStep
    assert kind(_model(checkpointing=False), "metal", micro_batch_tokens=128) is TrainStep
    assert kind(_model(checkpointing=False), "cpu", micro_batch_tokens=128) is TrainStep
    with pytest.raises(ValueError, match="trainer.train_step='fast'"):
        kind(_model(), kind="fast")


def test_layerwise_step_without_checkpointing_matches_train_step():
    """The layer-by-layer step recomputes layers itself: on a model without checkpointing (as "auto" runs it for
    small micro-batches on CUDA) it gives TrainStep's numbers."""
    schedule = [[_batch(1)], [_batch(2)]]
    reference_model = _model(checkpointing=False)
    layerwise_model = copy.deepcopy(reference_model)
    expected, expected_params = _run(TrainStep, reference_model, schedule, compile=True)
    got, got_params = _run(LayerwiseTrainStep, layerwise_model, schedule, compile=True)
    for (loss, n, norm), (loss_ref, n_ref, norm_ref) in zip(got, expected):
        assert (n, loss, norm) == (n_ref, pytest.approx(loss_ref, rel=1e-5), pytest.approx(norm_ref, rel=1e-4))
    for name, value in expected_params.items():
        np.testing.assert_allclose(np.array(got_params[name]), np.array(value), rtol=1e-4, atol=1e-5, err_msg=name)


def _reference_step(model, optimizer, batches, step_key):
    """Plain autograd through the model's public per-layer parts, uncompiled, every layer under the dropout key
    the layerwise step derives for it: the masks both draw are the same, so the numbers must be too. (Adapter
    dropout's own backward pass is checked against autograd on its mask in tests/models/test_lora_dropout.py.)"""
    keys = micro_batch_dropout_keys(step_key, len(batches))

    def loss(model, batch, key):
        hidden = model.embed(batch["input_ids"])
        mask = model.mask(hidden.shape[1], 0, batch.get("segment_ids"))
        for layer, layer_key in zip(model.layers, layer_dropout_keys(key, len(model.layers))):
            with dropout_keys(layer_key):
                hidden = uncheckpointed_call(layer)(layer, hidden, mask)
        return loss_from_hidden(model, model.final_norm(hidden), batch["labels"])

    loss_and_grad = nn.value_and_grad(model, loss)
    outputs = []
    for batch, key in zip(batches, keys):
        (loss_sum, n_tokens), grads = loss_and_grad(model, batch, key)
        outputs.append((loss_sum, n_tokens, grads))
    loss_sum, n_tokens, grads = sum_outputs(outputs)
    return loss_sum, n_tokens, make_update(model, optimizer, 0.5, compile=False)(grads, n_tokens)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("compile", [True, False])
def test_layerwise_step_with_dropout_matches_autograd_under_the_same_masks(packed, compile):
    schedule = [[_batch(1, packed), _batch(2, packed)], [_batch(3, packed), _batch(4, packed)]]
    reference_model = _model(dropout=0.3)
    layerwise_model = copy.deepcopy(reference_model)
    reference_optimizer, layerwise_optimizer = optim.AdamW(learning_rate=1e-2), optim.AdamW(learning_rate=1e-2)
    step = LayerwiseTrainStep(layerwise_model, layerwise_optimizer, grad_clip=0.5, compile=compile)
    for index, batches in enumerate(schedule):
        key = mx.random.key(100 + index)
        expected = _reference_step(reference_model, reference_optimizer, batches, key)
        got = step(batches, key=key)
        mx.eval(expected, got, reference_model.parameters(), layerwise_model.parameters())
        for value, reference in zip(got, expected):
            assert value.item() == pytest.approx(reference.item(), rel=1e-4)
    expected_params = dict(tree_flatten(reference_model.trainable_parameters()))
    for name, value in tree_flatten(layerwise_model.trainable_parameters()):
        np.testing.assert_allclose(np.array(value), np.array(expected_params[name]), rtol=1e-4, atol=1e-6,
                                   err_msg=name)


def test_dropout_masks_follow_the_key():
    """Dropout is on: other keys give other losses, the same key the same loss (so resumed runs repeat)."""
    batches = [_batch(1)]

    def loss_with(key, dropout=0.3):
        model = _model(dropout=dropout)
        step = LayerwiseTrainStep(model, optim.AdamW(learning_rate=1e-2), grad_clip=0.5)
        return step(batches, key=key)[0].item()

    assert loss_with(mx.random.key(1)) == loss_with(mx.random.key(1))
    assert loss_with(mx.random.key(1)) != loss_with(mx.random.key(2))
    assert loss_with(mx.random.key(1), dropout=0.0) != loss_with(mx.random.key(1))


def test_train_step_choices_are_the_config_checks():
    from harness.config_checks import TRAIN_STEPS

    assert TRAIN_STEPS == factory.TRAIN_STEPS


def _bfloat16(model):
    """`model` computing in bfloat16 as on a GPU: its dense weights, norms and quantization parameters in
    bfloat16, its adapters float32."""
    adapters = tree_flatten(model.trainable_parameters())
    model.set_dtype(mx.bfloat16)
    model.update(tree_unflatten(adapters))
    return model


def test_adapters_cast_once_a_step_give_the_numbers_of_casts_where_used():
    """In bfloat16 with float32 adapters, the layer-by-layer step computes on the stacks cast once a step
    (gradients coming back in bfloat16, joined and cast back); TrainStep casts each adapter where it is used and
    updates array by array: the same losses, norms and adapters, over a step with accumulation too."""
    schedule = [[_batch(1)], [_batch(2), _batch(3)], [_batch(4)]]
    reference_model = _bfloat16(_model())
    model = copy.deepcopy(reference_model)
    expected, expected_params = _run(TrainStep, reference_model, schedule, True)
    optimizer = optim.AdamW(learning_rate=1e-2)
    step = LayerwiseTrainStep(model, optimizer, grad_clip=0.5)
    assert step.stacks is not None
    got = []
    for batches in schedule:
        loss, n_tokens, norm = step(batches)
        mx.eval(loss, n_tokens, norm, model.parameters(), optimizer.state)
        got.append((loss.item(), n_tokens.item(), norm.item()))
    for (loss, n, norm), (loss_ref, n_ref, norm_ref) in zip(got, expected):
        assert (n, loss, norm) == (n_ref, pytest.approx(loss_ref, rel=1e-5), pytest.approx(norm_ref, rel=1e-4))
    params = dict(tree_flatten(model.trainable_parameters()))
    assert {p.dtype for p in params.values()} == {mx.float32}
    for name, value in expected_params.items():
        np.testing.assert_allclose(np.array(params[name]), np.array(value), rtol=1e-4, atol=1e-5, err_msg=name)


def test_arrays_replaced_after_the_step_was_built_are_used():
    """The step finds where each layer's arrays live once, when it is built, and reads them from there every
    step: a frozen weight and an adapter replaced afterwards (a checkpoint loaded, say) are what it trains on."""
    model = _model()
    step = LayerwiseTrainStep(model, optim.AdamW(learning_rate=1e-2), grad_clip=0.5)
    mx.eval(step([_batch(1)]))  # built, compiled and run once with the old arrays
    attention = model.layers[1].self_attn
    model.layers[1].input_layernorm.weight = model.layers[1].input_layernorm.weight * 1.5
    attention.q_proj.lora_B = attention.q_proj.lora_B + 0.1
    reference_model = copy.deepcopy(model)
    loss, n_tokens, norm = step([_batch(2)])
    (expected_loss, expected_tokens, expected_norm), = _run(TrainStep, reference_model, [[_batch(2)]], True)[0]
    # the loss and gradients of the arrays the model holds now (the optimizers' states differ, so not the update)
    assert (n_tokens.item(), loss.item(), norm.item()) == (
        expected_tokens, pytest.approx(expected_loss, rel=1e-5), pytest.approx(expected_norm, rel=1e-4))


@pytest.mark.parametrize("make_optimizer, stacked", [
    (lambda: optim.SGD(learning_rate=1e-2, momentum=0.9), True),  # element-wise: adapters stacked, cast once
    (lambda: optim.Adafactor(learning_rate=1e-2), False),  # factored moments: the model's own arrays, per array
], ids=["sgd", "adafactor"])
def test_layerwise_step_matches_train_step_with_other_optimizers(make_optimizer, stacked):
    reference_model = _bfloat16(_model())
    model = copy.deepcopy(reference_model)
    results = []
    for step_class, m in ((TrainStep, reference_model), (LayerwiseTrainStep, model)):
        optimizer = make_optimizer()
        step = step_class(m, optimizer, grad_clip=0.5)
        for batches in [[_batch(1)], [_batch(2), _batch(3)]]:
            mx.eval(step(batches), m.parameters(), optimizer.state)
        results.append(dict(tree_flatten(m.trainable_parameters())))
    assert (step.stacks is not None) == stacked
    expected, got = results
    for name, value in expected.items():
        np.testing.assert_allclose(np.array(got[name]), np.array(value), rtol=1e-4, atol=1e-5, err_msg=name)
