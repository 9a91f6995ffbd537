"""Adapter dropout: its hand-written backward pass equals autograd under the same mask, its masks have the right
rate and follow the key (its memory: tests/harness/test_train_step_memory.py)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from models.lora import LoRALinear, dropout_keep_threshold, dropout_keys, dropout_mask


def _chain_keys(key, n):
    """The keys the first `n` adapters called under `dropout_keys(key)` draw from (its documented chain)."""
    keys = []
    for _ in range(n):
        key, drawn = mx.random.split(key)
        keys.append(drawn)
    return keys


def _layer(in_features=37, out_features=11, rank=4, dropout=0.3):
    layer = LoRALinear(nn.Linear(in_features, out_features, bias=False), rank=rank, alpha=8, dropout=dropout)
    layer.lora_A = mx.random.normal(layer.lora_A.shape)
    layer.lora_B = mx.random.normal(layer.lora_B.shape)
    layer.train()
    return layer


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("x_shape", [(9, 37), (2, 5, 37), (2, 3, 2, 40)])
def test_dropout_gradients_equal_autograd_under_the_same_mask(compiled, x_shape):
    mx.random.seed(0)
    layer = _layer(in_features=x_shape[-1])
    x, weights = mx.random.normal(x_shape), mx.random.normal((*x_shape[:-1], 11))
    key = mx.random.key(5)
    (adapter_key,) = _chain_keys(key, 1)
    mask = dropout_mask(adapter_key, x.shape, 0.3)
    keep = dropout_keep_threshold(0.3) / 2**32

    def ours(a, b, x):
        layer.lora_A, layer.lora_B = a, b
        with dropout_keys(key):
            return (layer(x) * weights).sum()

    def reference(a, b, x):  # plain autograd through the masked, rescaled input
        dropped = mx.where(mask, x, 0) / keep
        return ((layer.base_layer(x) + layer.scale * (dropped @ a.T) @ b.T) * weights).sum()

    grad = mx.grad(ours, argnums=(0, 1, 2))
    if compiled:
        grad = mx.compile(grad)
    a, b = layer.lora_A, layer.lora_B
    expected = mx.grad(reference, argnums=(0, 1, 2))(a, b, x)
    got = grad(a, b, x)
    assert 0.5 < mask.astype(mx.float32).mean().item() < 0.9  # the mask really drops some inputs
    for name, value, want in zip(("lora_A", "lora_B", "x"), got, expected):
        np.testing.assert_allclose(np.array(value), np.array(want), rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(np.array(ours(a, b, x)), np.array(reference(a, b, x)), rtol=1e-5)


def test_dropout_gradients_survive_checkpointing():
    """Recomputation under `mx.checkpoint` with the key as an input draws the same masks: the same gradients."""
    mx.random.seed(1)
    layer = _layer()
    x = mx.random.normal((6, 37))

    def loss(a, x, key):
        layer.lora_A = a
        with dropout_keys(key):
            return (layer(x) ** 2).sum()

    def checkpointed(a, x, key):
        return mx.checkpoint(loss)(a, x, key)

    key = mx.random.key(3)
    expected = mx.grad(loss, argnums=(0, 1))(layer.lora_A, x, key)
    got = mx.grad(checkpointed, argnums=(0, 1))(layer.lora_A, x, key)
    for value, want in zip(got, expected):
        np.testing.assert_allclose(np.array(value), np.array(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_mask_has_the_requested_rate_and_no_structure(p):
    rows, columns = 512, 1000
    mask = np.array(dropout_mask(mx.random.key(0), (rows, columns), p))
    other = np.array(dropout_mask(mx.random.key(1), (rows, columns), p))
    keep, n = 1 - p, rows * columns
    tolerance = 5 * np.sqrt(keep * (1 - keep) / n)
    assert abs(mask.mean() - keep) < tolerance
    # Neighbours along either axis and masks of two keys are independent: P(both kept) = keep^2.
    for a, b in [(mask[:, 1:], mask[:, :-1]), (mask[1:], mask[:-1]), (mask, other)]:
        assert abs((a & b).mean() - keep**2) < 5 * np.sqrt(keep**2 * (1 - keep**2) / a.size)
    # Every row and column drops at about the same rate (no stripes).
    assert np.abs(mask.mean(axis=1) - keep).max() < 6 * np.sqrt(keep * (1 - keep) / columns)
    assert np.abs(mask.mean(axis=0) - keep).max() < 6 * np.sqrt(keep * (1 - keep) / rows)


def test_dropout_keeps_the_expectation():
    """Kept inputs are scaled by the inverse of the exact keep probability: the adapter's mean output is x's."""
    layer = LoRALinear(nn.Linear(1000, 1, bias=False), rank=1, alpha=1, dropout=0.3)
    layer.base_layer.weight = mx.zeros_like(layer.base_layer.weight)
    layer.lora_A, layer.lora_B = mx.full((1, 1000), 1e-3), mx.ones((1, 1))
    layer.train()
    with dropout_keys(mx.random.key(0)):
        outputs = layer(mx.ones((2000, 1000)))  # each row: the mean of 1000 dropped-and-rescaled ones
    keep = 1 - 0.3
    assert abs(outputs.mean().item() - 1.0) < 5 * np.sqrt((1 - keep) / keep / outputs.size / 1000)
    assert dropout_keep_threshold(0.3) / 2**32 == pytest.approx(keep, abs=2**-32)


def test_masks_follow_the_key_and_differ_between_adapters():
    mx.random.seed(2)
    q, k = _layer(), _layer()
    k.update(q.parameters())  # the same weights: only the masks can tell them apart
    x = mx.random.normal((8, 37))

    def outputs(key):
        with dropout_keys(key):
            return q(x), k(x)

    first, second = outputs(mx.random.key(0))
    assert not mx.allclose(first, second, atol=1e-3)
    assert all(mx.array_equal(a, b) for a, b in zip(outputs(mx.random.key(0)), (first, second)))
    assert not mx.allclose(outputs(mx.random.key(1))[0], first, atol=1e-3)


def test_without_a_key_chain_dropout_follows_the_global_random_state():
    layer = _layer()
    x = mx.random.normal((8, 37))
    mx.random.seed(4)
    first, second = layer(x), layer(x)
    mx.random.seed(4)
    assert mx.array_equal(layer(x), first)
    assert not mx.allclose(first, second, atol=1e-3)
    layer.eval()
    assert mx.allclose(layer(x), layer.base_layer(x) + layer.scale * (x @ layer.lora_A.T) @ layer.lora_B.T,
                       atol=1e-4)


def test_tiny_dropout_rounds_to_none():
    assert dropout_keep_threshold(2**-34) == 2**32
    layer = _layer(dropout=2**-34)
    x = mx.random.normal((4, 37))
    with dropout_keys(mx.random.key(0)):
        assert mx.array_equal(layer(x), layer.base_layer(x) + layer.scale * (x @ layer.lora_A.T) @ layer.lora_B.T)
