"""The whole-graph step keeps the adapters and their optimizer state laid out by columns, as autograd hands out
their gradients (`harness.step.standard.lay_out_by_columns`), and trains to the same values as by rows."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from harness.step.loss import causal_lm_loss
from harness.step.standard import TrainStep
from models.lora import LoRASpec, apply_lora
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


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradients_come_by_columns(dropout):
    """The premise: autograd lays out every adapter matrix's gradient by columns, with dropout's own backward pass
    too. Were it to change, the layout by columns would make the update mix layouts instead of removing that."""
    model = _model(dropout)
    _, grads = nn.value_and_grad(model, causal_lm_loss)(model, _batch(0))
    grads = tree_flatten(grads)
    mx.eval([g for _, g in grads])
    assert grads and all(_by_columns(g) for _, g in grads), [n for n, g in grads if not _by_columns(g)]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_adapters_and_moments_stay_by_columns_and_train_as_by_rows(monkeypatch, dropout):
    columns, columns_optimizer = _trained(monkeypatch, True, dropout)
    rows, rows_optimizer = _trained(monkeypatch, False, dropout)
    trained = tree_flatten(columns.trainable_parameters())
    moments = [m for _, m in tree_flatten(columns_optimizer.state) if isinstance(m, mx.array) and m.ndim == 2]
    assert len(moments) == 2 * len(trained)  # AdamW: m and v for each
    # three updates later the layout holds: the update read and wrote one layout
    assert all(_by_columns(p) for _, p in trained) and all(_by_columns(m) for m in moments)
    assert all(_by_rows(p) for _, p in tree_flatten(rows.trainable_parameters()))
    for (name, got), (_, want) in zip(trained, tree_flatten(rows.trainable_parameters())):
        # the products read the adapters in the other layout, so the sums run in another order: float32 rounding
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4 * np.abs(np.array(want)).max(),
                                   err_msg=name)
    for (_, got), (_, want) in zip(tree_flatten(columns_optimizer.state), tree_flatten(rows_optimizer.state)):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-3, atol=1e-9)
