import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten

import models  # noqa: F401  (loads the fast BLAS before MLX)
from models.activations import PolynomialSiLU, polynomial_silu
from models.attention import fused_attention, polynomial_attention
from models.cpu_paths import use_cpu_paths
from models.mistral import MistralForCausalLM, ModelArgs, attention_mask


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


def _reference_attention(q, k, v, scale, keep):
    """float64 numpy: repeat KV heads, mask with -inf, softmax, weighted sum."""
    q, k, v = (np.array(a, dtype=np.float64) for a in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    scores = np.where(keep, q @ k.swapaxes(-1, -2) * scale, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (probs / probs.sum(axis=-1, keepdims=True)) @ v


def _inputs(batch, heads, kv_heads, query_len, key_len, dim=16, seed=0):
    keys = mx.random.split(mx.random.key(seed), 3)
    q = 2.0 * mx.random.normal((batch, heads, query_len, dim), key=keys[0])
    k = 2.0 * mx.random.normal((batch, kv_heads, key_len, dim), key=keys[1])
    v = mx.random.normal((batch, kv_heads, key_len, dim), key=keys[2])
    return q, k, v


@pytest.mark.parametrize(
    "case",
    ["causal", "none", "sliding_window", "packed_segments", "kv_cache_prefix"],
)
def test_polynomial_attention_matches_float64_reference_and_fused_kernel(case):
    batch, heads, kv_heads, length = 2, 6, 2, 12
    query_len = 4 if case == "kv_cache_prefix" else length
    q, k, v = _inputs(batch, heads, kv_heads, query_len, length)
    if case == "causal":
        mask = attention_mask(length, length, None)
        assert mask == "causal"
        keep = np.tril(np.ones((length, length), bool))
    elif case == "none":
        mask, keep = None, np.ones((length, length), bool)
    elif case == "sliding_window":
        mask = attention_mask(length, length, sliding_window=3)
        keep = np.array(mask)
        assert keep.sum() < np.tril(np.ones((length, length))).sum()  # the window really cuts keys
    elif case == "packed_segments":
        segments = mx.array([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3])
        mask = attention_mask(length, length, None, segments)
        keep = np.array(mask)
    else:
        mask = attention_mask(query_len, length, None)
        keep = np.array(mask)
    scale = 16**-0.5
    got = polynomial_attention(q, k, v, scale, mask)
    ref = _reference_attention(q, k, v, scale, keep)
    np.testing.assert_allclose(np.array(got), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(got), np.array(fused_attention(q, k, v, scale, mask)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["causal", "packed_segments"])
def test_polynomial_attention_gradients_match_the_fused_kernel(mask_kind):
    q, k, v = _inputs(2, 4, 2, 10, 10, seed=1)
    if mask_kind == "causal":
        mask = "causal"
    else:
        mask = attention_mask(10, 10, None, mx.array([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3]))
    cotangent = mx.random.normal(q.shape, key=mx.random.key(2))

    def grads(attention):
        def loss(q, k, v):
            return (attention(q, k, v, 0.25, mask) * cotangent).sum()

        return mx.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for got, ref in zip(grads(polynomial_attention), grads(fused_attention)):
        np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-4, atol=1e-5)


def test_polynomial_attention_keeps_bfloat16_and_zeroes_masked_keys():
    q, k, v = (a.astype(mx.bfloat16) for a in _inputs(1, 2, 1, 6, 6))
    out = polynomial_attention(q, k, v, 0.25, "causal")
    assert out.dtype == mx.bfloat16
    # The first query may only see the first key: its output is exactly that key's value, in every head.
    np.testing.assert_array_equal(np.array(out[0, :, 0].astype(mx.float32)),
                                  np.repeat(np.array(v[0, :, 0].astype(mx.float32)), 2, axis=0))


@pytest.mark.parametrize("backend_exp, changed", [("polynomial", 2), ("native", 0)])
def test_swapped_model_gives_the_same_logits_and_gradients(backend_exp, changed):
    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    model = MistralForCausalLM(args)
    ids = mx.array([[1, 5, 9, 3, 7, 2], [4, 4, 8, 1, 0, 0]])

    def loss(m):
        return nn.losses.cross_entropy(m(ids)[:, :-1], ids[:, 1:], reduction="sum")

    before_logits = model(ids)
    before_grads = dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))
    assert use_cpu_paths(model, backend_exp) == changed
    assert sum(isinstance(layer.mlp.act_fn, PolynomialSiLU) for layer in model.layers) == changed
    assert sum(layer.self_attn.attention_fn is polynomial_attention for layer in model.layers) == changed
    np.testing.assert_allclose(np.array(model(ids)), np.array(before_logits), rtol=1e-5, atol=1e-5)
    after_grads = dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))
    for name, grad in before_grads.items():
        np.testing.assert_allclose(np.array(after_grads[name]), np.array(grad), rtol=1e-4, atol=1e-5, err_msg=name)
    assert use_cpu_paths(model, backend_exp) == 0  # already swapped: nothing left to change
