import models  # noqa: F401  (loads the fast BLAS before MLX)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from models.activations import PolynomialSiLU, polynomial_silu, use_fast_activations
from models.mistral import MistralForCausalLM, ModelArgs


def test_polynomial_silu_and_its_gradient_match_float32_silu():
    x = mx.array(np.linspace(-100.0, 100.0, 20_001, dtype=np.float32))
    np.testing.assert_allclose(np.array(polynomial_silu(x)), np.array(nn.silu(x)), rtol=2e-6, atol=1e-7)
    got = mx.grad(lambda v: polynomial_silu(v).sum())(x)
    ref = mx.grad(lambda v: nn.silu(v).sum())(x)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=2e-6, atol=1e-6)


def test_polynomial_silu_keeps_bfloat16():
    x = mx.random.normal((8, 16)).astype(mx.bfloat16)
    assert polynomial_silu(x).dtype == mx.bfloat16
    assert mx.grad(lambda v: polynomial_silu(v).astype(mx.float32).sum())(x).dtype == mx.bfloat16


@pytest.mark.parametrize("backend_exp, swapped", [("polynomial", 2), ("native", 0)])
def test_swapped_model_gives_the_same_logits(backend_exp, swapped):
    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    model = MistralForCausalLM(args)
    ids = mx.array([[1, 5, 9, 3, 7, 2]])
    before = model(ids)
    assert use_fast_activations(model, backend_exp) == swapped
    assert sum(isinstance(layer.mlp.act_fn, PolynomialSiLU) for layer in model.layers) == swapped
    np.testing.assert_allclose(np.array(model(ids)), np.array(before), rtol=1e-5, atol=1e-5)
