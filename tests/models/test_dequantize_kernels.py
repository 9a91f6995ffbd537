"""Our CUDA dequantization kernel (models/dequantize_kernels.py): where it runs, how it is switched off, and (on a
CUDA machine) its numbers against the plain float32 dequantization."""

import mlx.core as mx
import numpy as np
import pytest

from models.backend import backend_name
from models.dequantize_kernels import affine_dequantize_4bit, dequantizer
from models.quant import _affine_dequantize, quantize_group, quantize_rowwise

on_cuda = pytest.mark.skipif(backend_name() != "cuda", reason="the kernel runs on CUDA only")


def rowwise_and_group_weights(shape=(96, 256)):
    w = mx.random.normal(shape, key=mx.random.key(0)) * 0.05
    packed, scales, zeros = quantize_rowwise(w)
    yield "rowwise", (packed, scales, -scales * zeros)
    for group in (32, 64):
        yield f"group{group}", quantize_group(w, group_size=group)


def test_the_kernel_is_chosen_on_cuda_only_and_can_be_switched_off(monkeypatch):
    monkeypatch.delenv("QLORA_DEQUANTIZE", raising=False)
    assert dequantizer() == ("kernel" if backend_name() == "cuda" else "mlx")
    monkeypatch.setenv("QLORA_DEQUANTIZE", "mlx")
    assert dequantizer() == "mlx"
    packed, scales, biases = next(rowwise_and_group_weights())[1]
    assert affine_dequantize_4bit(packed, scales, biases, mx.float32) is None  # switched off: the caller's path
    monkeypatch.setenv("QLORA_DEQUANTIZE", "fast")
    with pytest.raises(ValueError, match="QLORA_DEQUANTIZE='fast'"):
        dequantizer()


@pytest.mark.skipif(backend_name() == "cuda", reason="elsewhere than CUDA")
def test_elsewhere_the_kernel_declines_and_dequantization_is_unchanged(monkeypatch):
    monkeypatch.setenv("QLORA_DEQUANTIZE", "kernel")  # asked for, but there is no CUDA here
    for _, (packed, scales, biases) in rowwise_and_group_weights():
        assert affine_dequantize_4bit(packed, scales, biases, mx.float32) is None
        dense = _affine_dequantize(packed, scales, biases, 4, mx.float32)
        reference = _affine_dequantize(packed, scales, biases, 4, mx.float32, native=False)
        np.testing.assert_allclose(np.array(dense), np.array(reference), rtol=1e-6, atol=1e-7)


@on_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_the_kernel_matches_float32_dequantization_within_one_rounding(dtype, monkeypatch):
    monkeypatch.setenv("QLORA_DEQUANTIZE", "kernel")
    for scheme, (packed, scales, biases) in rowwise_and_group_weights():
        ours = affine_dequantize_4bit(packed, scales, biases, dtype)
        assert ours is not None and ours.dtype == dtype and ours.shape == (96, 256)
        reference = _affine_dequantize(packed, scales, biases, 4, mx.float32, native=False)
        # computed in float32 (a fused multiply-add where the reference rounds the product first) and rounded
        # once to dtype; where scale * q and the bias cancel, that float32 difference is relative to the terms,
        # not to their sum: bounded by the row's largest value
        reference32 = np.array(reference)
        one_rounding = np.abs(np.array(reference.astype(dtype).astype(mx.float32)) - reference32)
        error = np.abs(np.array(ours.astype(mx.float32)) - reference32)
        terms = np.abs(reference32).max(axis=1, keepdims=True)
        assert (error <= one_rounding + 2e-7 * terms + 1e-9).all(), scheme
