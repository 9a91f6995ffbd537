"""Rotary embedding for attention's heads-first view in one CUDA kernel (models/rope_kernels.py): where it runs, how
it is switched off, and (on a CUDA machine) its values and gradients against MLX's `mx.fast.rope` on the transposed
input."""

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

from models.backend import backend_name
from models.rope_kernels import kernel_applies, rope_heads_first, rope_kernel_enabled

on_cuda = pytest.mark.skipif(backend_name() != "cuda", reason="the kernel runs on CUDA only")
TOLERANCE = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}  # about two roundings of each dtype


def _by_mlx(x, rope, offset=0):
    return rope(x.transpose(0, 2, 1, 3), offset=offset)


def test_the_kernel_is_chosen_on_cuda_only_and_can_be_switched_off(monkeypatch):
    x = mx.zeros((2, 5, 3, 32), dtype=mx.bfloat16)
    rope = nn.RoPE(32, traditional=False, base=10000.0)
    monkeypatch.delenv("QLORA_ROPE", raising=False)
    assert rope_kernel_enabled() == (backend_name() == "cuda")
    assert kernel_applies(x, rope, 0) == (backend_name() == "cuda")
    monkeypatch.setenv("QLORA_ROPE", "mlx")
    assert not kernel_applies(x, rope, 0)
    monkeypatch.setenv("QLORA_ROPE", "fast")
    with pytest.raises(ValueError, match="QLORA_ROPE='fast'"):
        rope_kernel_enabled()


def test_where_the_kernel_does_not_apply_mlx_rotates(monkeypatch):
    monkeypatch.delenv("QLORA_ROPE", raising=False)
    x = mx.random.normal((2, 5, 3, 32), key=mx.random.key(0))
    rope = nn.RoPE(32, traditional=False, base=10000.0)
    for other, offset in [(rope, 7), (nn.RoPE(32, traditional=True), 0), (nn.RoPE(16), 0), (nn.RoPE(32, scale=0.5), 0)]:
        assert not kernel_applies(x, other, offset)
        np.testing.assert_array_equal(np.array(rope_heads_first(x, other, offset)), np.array(_by_mlx(x, other, offset)))


@on_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 3, 32), (1, 64, 8, 128)])
def test_the_kernel_matches_mlx_rope_and_its_gradient(dtype, shape, monkeypatch):
    monkeypatch.delenv("QLORA_ROPE", raising=False)
    rope = nn.RoPE(shape[-1], traditional=False, base=10000.0)
    x = mx.random.normal(shape, key=mx.random.key(1)).astype(dtype)
    cotangent = mx.random.normal((shape[0], shape[2], shape[1], shape[3]), key=mx.random.key(2)).astype(dtype)
    assert kernel_applies(x, rope, 0)
    outputs, grads = {}, {}
    for name, fn in (("kernel", lambda a: rope_heads_first(a, rope)), ("mlx", lambda a: _by_mlx(a, rope))):
        (out,), (grad,) = mx.vjp(lambda a: [fn(a)], [x], [cotangent])
        outputs[name], grads[name] = np.array(out.astype(mx.float32)), np.array(grad.astype(mx.float32))
    assert outputs["kernel"].shape == (shape[0], shape[2], shape[1], shape[3]) and grads["kernel"].shape == shape
    scale = TOLERANCE[dtype]
    np.testing.assert_allclose(outputs["kernel"], outputs["mlx"], rtol=scale, atol=scale)
    np.testing.assert_allclose(grads["kernel"], grads["mlx"], rtol=scale, atol=scale)
    # the gradient inverts the rotation: rotating it forward gives the cotangent back, moved to the input layout
    back = rope_heads_first(mx.array(grads["kernel"]).astype(mx.float32), rope)
    np.testing.assert_allclose(np.array(back), np.array(cotangent.astype(mx.float32)), rtol=4 * scale, atol=4 * scale)
