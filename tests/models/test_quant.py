"""Quantization: round-trip bounds, storage size, the NF4 code book, and every QuantizedLinear path vs float32."""

import math
from statistics import NormalDist

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from models import quant
from models.backend import backend_name
from models.quant import (
    QuantizedEmbedding,
    QuantizedLinear,
    QuantSpec,
    dequantize_group,
    dequantize_nf4,
    dequantize_rowwise,
    model_bits_per_weight,
    nf4_absmax,
    nf4_code_values,
    quantize_group,
    quantize_model,
    quantize_nf4,
    quantize_rowwise,
    quantized_shell,
    dense_weights_kept_for_backward,
    dense_weights_shared,
    set_forward_path,
    unpack_codes,
)
from tests.models.conftest import build_tiny_model, random_ids

# bitsandbytes' NF4 table (bitsandbytes/functional.py, `get_4bit_type("nf4")`), as published with QLoRA.
BITSANDBYTES_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def weights(out_features=48, in_features=256, seed=0) -> mx.array:
    """Rows with very different ranges and offsets, as real projections have."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_features, in_features)) * rng.uniform(0.01, 2.0, (out_features, 1))
    return mx.array((w + rng.uniform(-1, 1, (out_features, 1))).astype(np.float32))


def test_rowwise_round_trip_within_half_a_step_of_each_row():
    w = weights()
    packed, scales, zeros = quantize_rowwise(w)
    restored = dequantize_rowwise(packed, scales, zeros)
    w_np, r_np, s_np = np.array(w), np.array(restored), np.array(scales)
    step = (w_np.max(axis=1, keepdims=True) - w_np.min(axis=1, keepdims=True)) / 15
    np.testing.assert_allclose(s_np, step, rtol=1e-6)  # the step is the row's range over 15 levels
    assert (np.abs(w_np - r_np) <= s_np / 2 * (1 + 1e-5)).all()
    # every one of the 16 levels is used somewhere, and the row's extremes are represented
    codes = np.array(unpack_codes(packed, 4))
    assert codes.min() == 0 and codes.max() == 15
    np.testing.assert_allclose(r_np.min(axis=1), w_np.min(axis=1), rtol=1e-6, atol=1e-6)


def test_rowwise_storage_is_four_bits_per_weight_plus_row_parameters():
    w = weights(out_features=32, in_features=512)
    packed, scales, zeros = quantize_rowwise(w)
    assert packed.dtype == mx.uint32 and packed.shape == (32, 512 // 8)
    assert packed.nbytes * 8 == 4 * w.size
    assert scales.shape == zeros.shape == (32, 1)
    layer = QuantizedLinear.from_linear(linear_from(w), QuantSpec("rowwise"))
    assert layer.bits_per_weight == pytest.approx(4 + 2 * 32 / 512)


def test_rowwise_constant_row_is_exact():
    w = mx.concatenate([mx.full((1, 64), 0.37), weights(3, 64)])
    restored = dequantize_rowwise(*quantize_rowwise(w))
    np.testing.assert_array_equal(np.array(restored)[0], np.array(w)[0])


def test_rowwise_uses_mlx_affine_layout():
    """Our packed words and MLX's are the same format: each side's dequantizer reads the other's codes."""
    w = weights(16, 256)
    packed, scales, zeros = quantize_rowwise(w)
    groups = (16, 256 // 64)
    mlx_view = mx.dequantize(packed, mx.broadcast_to(scales, groups), mx.broadcast_to(-scales * zeros, groups),
                             group_size=64, bits=4)
    # equal up to rounding: GPU kernels may fuse the multiply-add
    assert mx.allclose(mlx_view, dequantize_rowwise(packed, scales, zeros, native=False), rtol=1e-6, atol=1e-6)
    q, s, b = mx.quantize(w, group_size=64, bits=4)
    assert mx.allclose(dequantize_group(q, s, b, native=False), mx.dequantize(q, s, b, group_size=64, bits=4),
                       atol=1e-6)
    packed, scales, biases = quantize_group(w, 32)
    assert mx.allclose(dequantize_group(packed, scales, biases, native=False),
                       dequantize_group(packed, scales, biases), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_group_round_trip_within_half_a_step_of_each_group(group_size):
    w = weights(24, 256)
    packed, scales, biases = quantize_group(w, group_size)
    assert scales.shape == (24, 256 // group_size) and scales.dtype == mx.float16
    restored = np.array(dequantize_group(packed, scales, biases))
    groups = np.array(w).reshape(24, -1, group_size)
    step = np.array(scales.astype(mx.float32))
    error = np.abs(groups - restored.reshape(groups.shape))
    assert (error <= step[..., None] / 2 * (1 + 1e-4)).all()
    # float16 parameters widen the step only by the bias' rounding (a couple of ulps of the minimum)
    low = groups.min(-1)
    widest = (groups.max(-1) - low + 2**-9 * np.abs(low)) / 15
    assert (step <= widest * (1 + 2**-9)).all()


def test_nf4_code_book_derived_from_normal_quantiles_matches_bitsandbytes():
    values = nf4_code_values()
    np.testing.assert_allclose(values, BITSANDBYTES_NF4, atol=2e-7)
    # the definition itself: the largest code is the quantile at offset, scaled to 1
    offset = 1 - 0.5 * (1 / 32 + 1 / 30)
    top = NormalDist().inv_cdf(offset)
    assert values[8] == pytest.approx(NormalDist().inv_cdf(offset + (0.5 - offset) * 7 / 8) / top)


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_round_trip_picks_the_nearest_code_of_each_block(double_quant):
    w = weights(16, 256)
    arrays = quantize_nf4(w, double_quant=double_quant)
    restored = np.array(dequantize_nf4(arrays))
    absmax = np.array(nf4_absmax(arrays, 16, 256))
    true_absmax = np.abs(np.array(w)).reshape(16, 4, 64).max(-1)
    if double_quant:  # 8-bit absmax: within half a step of its block of 256 constants
        assert np.abs(absmax - true_absmax).max() <= np.array(arrays["absmax_scale"]).max() / 2 * (1 + 1e-5)
        assert arrays["absmax_q"].dtype == mx.uint8
    else:
        np.testing.assert_array_equal(absmax, true_absmax)
    code = np.array(nf4_code_values())
    normalized = restored.reshape(16, 4, 64) / absmax[..., None]
    assert np.abs(normalized[..., None] - code).min(-1).max() < 1e-6  # every value is a code
    target = np.array(w).reshape(16, 4, 64) / absmax[..., None]
    chosen = np.abs(target - normalized)
    best = np.abs(target[..., None] - code).min(-1)
    assert (chosen <= best + 1e-6).all()  # and the nearest one


def linear_from(w: mx.array, bias: bool = False) -> nn.Linear:
    linear = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    linear.weight = w
    if bias:
        linear.bias = mx.arange(w.shape[0], dtype=mx.float32) / w.shape[0]
    return linear


SPECS = {
    "rowwise": QuantSpec("rowwise"),
    "group64": QuantSpec("group", group_size=64),
    "nf4": QuantSpec("nf4"),
}


PATHS = [(name, path) for name in SPECS for path in ("dequantize", "dequantize_saved", "fused", "reference")
         if not (name == "nf4" and path == "fused")]  # nf4 has no fused kernel


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("name, path", PATHS)
def test_quantized_linear_paths_match_float32_dense_reference(name, path, dtype):
    spec = SPECS[name]
    layer = QuantizedLinear.from_linear(linear_from(weights(40, 128), bias=True), spec)
    layer.forward_path = path
    dense = layer.dequantize(mx.float32)
    x = mx.array(np.random.default_rng(1).standard_normal((2, 3, 128)).astype(np.float32))
    cotangent = mx.array(np.random.default_rng(2).standard_normal((2, 3, 40)).astype(np.float32))

    def loss(layer_fn, x):
        return (layer_fn(x).astype(mx.float32) * cotangent).sum()

    y = layer(x.astype(dtype))
    grad = mx.grad(lambda x: loss(layer, x))(x.astype(dtype))
    y_ref = mx.matmul(x, dense.T, stream=mx.cpu) + layer.bias  # float32 reference, never TF32
    grad_ref = mx.matmul(cotangent, dense, stream=mx.cpu)
    assert y.dtype == dtype and grad.dtype == dtype
    # float32: exact up to summation order on the CPU; CUDA's float32 matmuls may round inputs to TF32
    f32 = 1e-6 if backend_name() == "cpu" else 1e-3
    tol = (f32 if dtype == mx.float32 else 0.06) * max(1.0, float(mx.abs(y_ref).max()))
    assert mx.abs(y.astype(mx.float32) - y_ref).max().item() < tol
    gtol = (f32 if dtype == mx.float32 else 0.06) * max(1.0, float(mx.abs(grad_ref).max()))
    assert mx.abs(grad.astype(mx.float32) - grad_ref).max().item() < gtol


def test_fused_path_refuses_nf4():
    layer = QuantizedLinear.from_linear(linear_from(weights(8, 64)), QuantSpec("nf4"))
    layer.forward_path = "fused"
    with pytest.raises(ValueError, match="affine"):
        layer(mx.zeros((1, 64)))


def test_quantized_linear_is_frozen_and_has_no_gradient_to_its_weights():
    layer = QuantizedLinear.from_linear(linear_from(weights(8, 64)), QuantSpec("rowwise"))
    assert layer.trainable_parameters() == {}


def test_set_forward_path_reaches_every_quantized_layer():
    model = build_tiny_model()
    quantize_model(model, QuantSpec("group"))
    ids = random_ids()
    assert set_forward_path(model, "fused") == 14
    fused = model(ids)
    set_forward_path(model, "reference")
    assert mx.allclose(fused, model(ids), atol=1e-4)
    with pytest.raises(ValueError, match="forward_path"):
        set_forward_path(model, "fast")


def test_auto_path_fuses_only_for_few_tokens_and_affine_schemes():
    rowwise = QuantizedLinear.from_linear(linear_from(weights(8, 64)), QuantSpec("rowwise"))
    nf4 = QuantizedLinear.from_linear(linear_from(weights(8, 64)), QuantSpec("nf4"))
    one_token, many_tokens = mx.zeros((1, 1, 64)), mx.zeros((4, 128, 64))
    assert rowwise.choose_path(one_token) == "fused"
    assert rowwise.choose_path(many_tokens) == "dequantize"
    assert nf4.choose_path(one_token) == "dequantize"
    with dense_weights_kept_for_backward():  # inside a checkpointed layer
        assert rowwise.choose_path(many_tokens) == "dequantize_saved"
        assert rowwise.choose_path(one_token) == "fused"
    assert rowwise.choose_path(many_tokens) == "dequantize"
    rowwise.forward_path = "reference"
    assert rowwise.choose_path(one_token) == "reference"


def dequantized_copy(model, seed=0) -> nn.Module:
    """A dense model whose weights are exactly what `model`'s quantized layers store."""
    dense = build_tiny_model(seed=seed)
    weights_ = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            weights_[f"{name}.weight"] = module.dequantize(mx.float32)
    if isinstance(model.model.embed_tokens, QuantizedEmbedding):
        weights_["model.embed_tokens.weight"] = model.model.embed_tokens.dequantize(mx.float32)
    dense.load_weights(list(weights_.items()), strict=False)
    return dense


def correlation(a: mx.array, b: mx.array) -> float:
    return float(np.corrcoef(np.array(a).ravel(), np.array(b).ravel())[0, 1])


@pytest.mark.parametrize("method", ["rowwise", "group", "nf4"])
def test_quantize_model_quantizes_every_projection_and_keeps_embeddings_dense(method):
    model = build_tiny_model()
    ids = random_ids()
    dense_logits = model(ids)
    quantize_model(model, QuantSpec(method))
    names = [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(names) == 2 * 7
    assert isinstance(model.model.embed_tokens, nn.Embedding) and isinstance(model.lm_head, nn.Linear)
    quant_logits = model(ids)
    assert mx.allclose(quant_logits, dequantized_copy(model)(ids), atol=1e-4)
    assert correlation(quant_logits, dense_logits) > 0.9  # 4-bit weights move logits, but not far
    assert not mx.array_equal(quant_logits, dense_logits)


def test_quantize_lm_head_and_embeddings_when_configured():
    model = build_tiny_model()
    ids = random_ids()
    quantize_model(model, QuantSpec("group", quantize_embeddings=True, quantize_lm_head=True))
    assert isinstance(model.lm_head, QuantizedLinear)
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    reference = dequantized_copy(model)
    reference.lm_head.weight = model.lm_head.dequantize(mx.float32)
    assert mx.allclose(model(ids), reference(ids), atol=1e-4)
    report = model_bits_per_weight(model)
    assert report["quantized_bits_per_weight"] == pytest.approx(4.5)
    assert report["model_bits_per_weight"] < 4.6  # only the norms are left at 32 bits


@pytest.mark.parametrize("spec", [QuantSpec("rowwise"), QuantSpec("group", group_size=32), QuantSpec("nf4")])
def test_quantized_shell_reloads_a_saved_quantized_model(tmp_path, spec):
    model = build_tiny_model()
    quantize_model(model, spec)
    path = tmp_path / "quantized.safetensors"
    mx.save_safetensors(str(path), dict(tree_flatten(model.parameters())))
    shell = quantized_shell(build_tiny_model(seed=1), spec)
    shapes = {k: v.shape for k, v in tree_flatten(shell.parameters())}
    assert shapes == {k: v.shape for k, v in tree_flatten(model.parameters())}
    shell.load_weights(str(path))
    ids = random_ids()
    assert mx.array_equal(shell(ids), model(ids))


def test_bits_per_weight_per_method():
    """Stored bits at a Mistral-like row length (4096 inputs)."""
    linear = linear_from(weights(16, 4096))
    measured = {name: QuantizedLinear.from_linear(linear, spec).bits_per_weight for name, spec in {
        "rowwise": QuantSpec("rowwise"), "group64": QuantSpec("group", group_size=64),
        "group128": QuantSpec("group", group_size=128), "nf4": QuantSpec("nf4"),
        "nf4_no_double_quant": QuantSpec("nf4", double_quant=False)}.items()}
    n = 16 * 4096
    blocks = n // 64
    assert measured["rowwise"] == pytest.approx(4 + 64 / 4096)  # float32 scale + bias per row
    assert measured["group64"] == pytest.approx(4 + 32 / 64)  # float16 scale + bias per 64
    assert measured["group128"] == pytest.approx(4 + 32 / 128)
    assert measured["nf4"] == pytest.approx(4 + (8 * blocks + 32 * math.ceil(blocks / 256) + 32) / n)
    assert measured["nf4_no_double_quant"] == pytest.approx(4 + 32 / 64)


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="method"):
        QuantSpec("int3")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec("group", group_size=48)
    with pytest.raises(ValueError, match="unknown names"):
        QuantSpec(modules=("q_proj", "qproj"))


def peak_grad_memory(depth: int, path: str) -> float:
    """Peak bytes above the resting state for the input gradient through `depth` stacked 512x512 layers."""
    layers = [QuantizedLinear.from_linear(nn.Linear(512, 512, bias=False), QuantSpec("rowwise")) for _ in range(depth)]
    for layer in layers:
        layer.forward_path = path
    x = mx.random.normal((16, 512))
    mx.eval(x, [layer.parameters() for layer in layers])

    def f(x):
        for layer in layers:
            x = layer(x)
        return x.sum()

    mx.clear_cache()
    mx.reset_peak_memory()
    resting = mx.get_active_memory()
    mx.eval(mx.grad(f)(x))
    return mx.get_peak_memory() - resting


def test_dequantize_path_backward_recomputes_instead_of_keeping_dense_weights():
    dense_weight = 512 * 512 * 4
    # differentiating the plain path keeps a dense weight per layer alive for the backward pass ...
    assert peak_grad_memory(32, "reference") > 12 * dense_weight
    # ... the custom VJP rebuilds each one when needed: peak memory does not grow with depth
    shallow, deep = peak_grad_memory(8, "dequantize"), peak_grad_memory(32, "dequantize")
    assert deep < 6 * dense_weight and deep <= shallow + dense_weight


@pytest.mark.parametrize("spec", [QuantSpec("rowwise"), QuantSpec("group", group_size=64), QuantSpec("nf4")])
def test_shared_dense_weights_give_the_same_outputs_and_gradients_and_dequantize_once(spec, monkeypatch):
    layers = [QuantizedLinear.from_linear(nn.Linear(256, 48), spec) for _ in range(2)]
    x = mx.random.normal((2, 5, 256), key=mx.random.key(3))

    def loss(x):  # each layer called twice, as two CPU streams and a backward pass would
        return sum(((layer(x) * layer(x[::-1])) ** 2).sum() for layer in layers)

    expected_loss, expected_grad = mx.value_and_grad(loss)(x)
    calls: list = []
    build = quant._dense_weight  # what every dequantization of a QuantizedLinear runs
    monkeypatch.setattr(quant, "_dense_weight", lambda *args, **kwargs: calls.append(args) or build(*args, **kwargs))
    head = QuantizedEmbedding.from_embedding(nn.Embedding(64, 256), spec)  # a tied LM head's table
    head_weight = head.dequantize(mx.float32)
    calls.clear()
    with dense_weights_shared([*layers, head, nn.Linear(2, 2)], mx.float32):  # other modules are ignored
        shared_loss, shared_grad = mx.value_and_grad(loss)(x)
        np.testing.assert_array_equal(np.array(head.dequantize(mx.float32)), np.array(head_weight))
    assert len(calls) == len(layers) + 1  # once each, however often the layer is called and differentiated
    np.testing.assert_allclose(float(shared_loss), float(expected_loss), rtol=1e-5)
    np.testing.assert_allclose(np.array(shared_grad), np.array(expected_grad), rtol=1e-4, atol=1e-4)
