"""The whole-graph step keeps each adapter matrix and its optimizer state laid out as autograd hands out its
gradient (`LoRALinear.gradient_layouts`, `harness.step.standard.lay_out_by_columns`), and trains to the same values
as with everything by rows."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from harness.step.loss import causal_lm_loss
from harness.step.stacked import parameter_place
from harness.step.standard import TrainStep
from models.lora import LoRALinear, LoRASpec, apply_lora
from models.mistral import MistralForCausalLM, ModelArgs


def _by_columns(array: mx.array) -> bool:
    return array.ndim == 2 and memoryview(array).strides == (array.itemsize, array.itemsize * array.shape[0])


def _by_rows(array: mx.array) -> bool:
    return array.ndim == 2 and memoryview(array).strides == (array.itemsize * array.shape[1], array.itemsize)


def _model(dropout: float) -> MistralForCausalLM:
    mx.random.seed(0)
    args = ModelArgs(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    model = MistralForCausalLM(args)
    apply_lora(model, LoRASpec(rank=4, dropout=dropout))
    model.train()
    return model


def _batch(i: int) -> dict:
    tokens = mx.random.randint(1, 128, (2, 16), key=mx.random.key(i))
    return {"input_ids": tokens, "labels": tokens}


def _trained(monkeypatch, by_columns: bool, dropout: float):
    monkeypatch.setattr(TrainStep, "adapters_by_columns", by_columns)
    model = _model(dropout)
    optimizer = optim.AdamW(learning_rate=1e-2)
    step = TrainStep(model, optimizer, grad_clip=1.0)
    for i in range(3):
        mx.random.seed(10 + i)  # the same dropout masks both ways
        mx.eval(step([_batch(i)]), model.parameters(), optimizer.state)
    return model, optimizer


def _declared(model) -> dict[str, str]:
    """Each adapter matrix's gradient layout as `LoRALinear.gradient_layouts` declares it, by parameter path."""
    return {f"{path}.{name}": layout for path, module in model.named_modules() if isinstance(module, LoRALinear)
            for name, layout in module.gradient_layouts().items()}


def _layout(array: mx.array) -> str:
    return "columns" if _by_columns(array) else "rows" if _by_rows(array) else "other"


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradients_come_as_declared(dropout):
    """The premise: autograd lays out every adapter matrix's gradient as `gradient_layouts` says (by columns, but A's
    by rows under dropout's hash draw). Were MLX to change that, the step would mix layouts again."""
    model = _model(dropout)
    _, grads = nn.value_and_grad(model, causal_lm_loss)(model, _batch(0))
    grads = dict(tree_flatten(grads))
    mx.eval(list(grads.values()))
    declared = _declared(model)
    assert set(grads) == set(declared)
    assert {name: _layout(g) for name, g in grads.items()} == declared
    assert "columns" in declared.values()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_adapters_and_moments_stay_as_their_gradients_and_train_as_by_rows(monkeypatch, dropout):
    columns, columns_optimizer = _trained(monkeypatch, True, dropout)
    rows, rows_optimizer = _trained(monkeypatch, False, dropout)
    declared = _declared(columns)
    trained = tree_flatten(columns.trainable_parameters())
    # three updates later the layouts hold: the update read and wrote one layout
    for name, parameter in trained:
        container, key = parameter_place(columns_optimizer.state, name)
        moments = container[key]
        assert [_layout(parameter), _layout(moments["m"]), _layout(moments["v"])] == [declared[name]] * 3, name
    assert all(_by_rows(p) for _, p in tree_flatten(rows.trainable_parameters()))
    for (name, got), (_, want) in zip(trained, tree_flatten(rows.trainable_parameters())):
        # the products read the adapters in the other layout, so the sums run in another order: float32 rounding,
        # which AdamW's normalised steps carry (up to 3e-4 of the largest value in a run outside pytest); a layout
        # mix-up would move values by their own size
        np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-3 * np.abs(np.array(want)).max(),
                                   err_msg=name)
    for (name, got), (_, want) in zip(tree_flatten(columns_optimizer.state), tree_flatten(rows_optimizer.state)):
        np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-3 * np.abs(np.array(want)).max(),
                                   err_msg=name)
