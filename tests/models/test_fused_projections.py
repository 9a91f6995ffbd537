"""q/k/v and gate/up as one product each (models/fused_projections.py): the same numbers as one product per
projection, with fewer dequantizations, and the unfused computation wherever fusing does not apply."""

import contextlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from models import quant
from models.fused_projections import fuse_projections, unfuse_projections
from models.lora import LoRASpec, apply_lora, dropout_keys
from models.quant import QuantSpec, dense_weights_shared, quantize_model, set_forward_path
from tests.models.conftest import build_tiny_model, random_ids


def adapted_model(spec: QuantSpec | None, dropout: float = 0.0) -> nn.Module:
    """The tiny model, quantized by `spec`, with adapters whose B is not zero (so the adapters change outputs)."""
    model = build_tiny_model()
    if spec is not None:
        quantize_model(model, spec)
    apply_lora(model, LoRASpec(rank=4, alpha=8.0, dropout=dropout))
    mx.random.seed(1)
    model.update(tree_map(lambda p: 0.2 * mx.random.normal(p.shape), model.trainable_parameters()))
    mx.eval(model.parameters())
    return model


def loss_and_grads(model: nn.Module, ids: mx.array, key: mx.array | None = None):
    def loss(model):
        return (model(ids).astype(mx.float32) ** 2).mean()

    with dropout_keys(key) if key is not None else contextlib.nullcontext():
        value, grads = nn.value_and_grad(model, loss)(model)
    mx.eval(value, grads)
    return float(value), dict(tree_flatten(grads))


def count_dequantizations(monkeypatch) -> list:
    calls: list = []
    build = quant._dense_weight
    monkeypatch.setattr(quant, "_dense_weight", lambda *a, **k: calls.append(a[2]["weight"].shape) or build(*a, **k))
    return calls


def assert_same(expected, actual, tol=2e-5):
    (expected_loss, expected_grads), (loss, grads) = expected, actual
    np.testing.assert_allclose(loss, expected_loss, rtol=tol)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        np.testing.assert_allclose(np.array(grad), np.array(expected_grads[name]), rtol=tol, atol=tol, err_msg=name)


SCHEMES = {
    "rowwise": QuantSpec("rowwise"),
    "group": QuantSpec("group", group_size=32),
    "nf4 without double quantization": QuantSpec("nf4", double_quant=False),
}


@pytest.mark.parametrize("spec", SCHEMES.values(), ids=SCHEMES.keys())
@pytest.mark.parametrize("path", ["dequantize", "dequantize_saved"])
def test_fused_projections_give_the_same_loss_and_gradients_from_four_dequantizations_a_layer_instead_of_seven(
    spec, path, monkeypatch
):
    model, ids = adapted_model(spec), random_ids(3, 20)
    layers = len(model.model.layers)
    set_forward_path(model, path)
    expected = loss_and_grads(model, ids)
    calls = count_dequantizations(monkeypatch)
    mx.eval(model(ids))
    assert len(calls) == 7 * layers
    calls.clear()
    assert fuse_projections(model) == 2 * layers
    mx.eval(model(ids))
    assert len(calls) == 4 * layers  # q/k/v as one weight, gate/up as one, o and down alone
    assert (2 * model.args.intermediate_size, 64 * 4 // 32) in calls  # gate and up's codes stacked: one weight
    assert_same(expected, loss_and_grads(model, ids))
    assert unfuse_projections(model) == 2 * layers
    assert_same(expected, loss_and_grads(model, ids))
    calls.clear()
    mx.eval(model(ids))
    assert len(calls) == 7 * layers


def test_adapter_dropout_draws_the_same_masks_fused_as_separate():
    model, ids = adapted_model(QuantSpec("rowwise"), dropout=0.3), random_ids(2, 24)
    set_forward_path(model, "dequantize")
    model.train()
    key = mx.random.key(7)
    expected = loss_and_grads(model, ids, key)
    fuse_projections(model)
    assert_same(expected, loss_and_grads(model, ids, key))
    other_key = loss_and_grads(model, ids, mx.random.key(8))  # the masks do change with the key
    assert abs(other_key[0] - expected[0]) > 1e-6


def test_shared_dense_weights_build_each_stacked_weight_once(monkeypatch):
    model, ids = adapted_model(QuantSpec("rowwise")), random_ids(2, 16)
    fuse_projections(model)
    modules = [m for layer in model.model.layers for _, m in layer.named_modules()]
    concatenations: list = []
    concatenate = mx.concatenate
    monkeypatch.setattr(mx, "concatenate", lambda arrays, **k: concatenations.append(len(arrays)) or concatenate(
        arrays, **k))
    with dense_weights_shared(modules, mx.float32):

        def loss(model):  # two calls, as two CPU streams would make, and a backward pass
            return sum((model(part) ** 2).mean() for part in (ids[:1], ids[1:])) / 2

        value, grads = nn.value_and_grad(model, loss)(model)
        mx.eval(value, grads)
    layers = len(model.model.layers)
    stacked_weights = concatenations.count(3) + concatenations.count(2)
    # Each block's stacked weight once (4 here), its adapters' A stacked per call (2 calls x 4 blocks)
    assert stacked_weights == 2 * layers + 2 * 2 * layers
    unfuse_projections(model)
    with dense_weights_shared(modules, mx.float32):
        expected_value, expected_grads = nn.value_and_grad(model, loss)(model)
    np.testing.assert_allclose(float(value), float(expected_value), rtol=2e-5)
    for (name, grad), (_, expected_grad) in zip(tree_flatten(grads), tree_flatten(expected_grads)):
        np.testing.assert_allclose(np.array(grad), np.array(expected_grad), rtol=2e-5, atol=2e-5, err_msg=name)


@pytest.mark.parametrize(
    "case",
    ["nf4 double quantization", "fused kernel (few tokens)", "reference path", "dense base", "bias"],
)
def test_groups_that_cannot_be_stacked_are_computed_one_projection_at_a_time(case, monkeypatch):
    spec = QuantSpec("nf4") if case == "nf4 double quantization" else QuantSpec("rowwise")
    model = adapted_model(None if case == "dense base" else spec)
    ids = random_ids(1, 2) if case == "fused kernel (few tokens)" else random_ids(2, 12)
    if case == "reference path":
        set_forward_path(model, "reference")
    if case == "bias":  # one projection of every group with a bias
        for layer in model.model.layers:
            for base in (layer.self_attn.q_proj.base_layer, layer.mlp.gate_proj.base_layer):
                base.bias = 0.1 * mx.ones((base.out_features,))
    calls = count_dequantizations(monkeypatch)
    expected = loss_and_grads(model, ids)
    separate_calls = list(calls)
    calls.clear()
    fuse_projections(model)
    assert_same(expected, loss_and_grads(model, ids))
    assert calls == separate_calls  # one weight at a time, as many as without fusing
