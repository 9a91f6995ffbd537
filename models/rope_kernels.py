"""Rotary position embedding for attention's heads-first view of the projections: one CUDA kernel each way.

Why: attention rotates queries and keys laid out `(batch, heads, length, head_dim)`, a transposed view of the
projections' `(batch, length, heads, head_dim)` output. On CUDA, MLX's `mx.fast.rope` rotates such a view in a
kernel that reached about a sixth of the H200's memory speed: at 8 x 512 on the 7B shape its 128 rotations a step
(forward and backward, queries and keys) took 9.1-11.3 ms of GPU time (BENCHMARKS.md, "Session 11"). Here one kernel
reads the projection's rows and writes them rotated in the same layout, 16 bytes per load and store, handed on as
their heads-first view; the backward pass is the same kernel with the rotation inverted (2.5 ms of GPU time a step
against 9.7). Written heads-first and contiguous instead, the rotated queries made the whole-graph 8 x 512 step hold
1.0 GB more than with MLX's rope; in the rows' layout it holds what MLX's rope holds (BENCHMARKS.md, "Session 12").

Only CUDA runs the kernel, for the whole head dimension rotated in halves (`traditional=False`, Mistral's and
Llama's layout), unit scale and position offset 0 (training; generation with a cache offsets positions and takes
MLX's path). Elsewhere, and where it does not apply, `rope_heads_first` is `rope(x.transpose(0, 2, 1, 3))` as
before. `QLORA_ROPE=mlx` turns the kernel off.
"""

from __future__ import annotations

import functools
import math
import os
import struct

import mlx.core as mx
from mlx import nn

from models.backend import backend_name

_DTYPES = (mx.float32, mx.float16, mx.bfloat16)

# Threads run over (batch, position, head) rows and 8-element chunks of the first half of each head's vector; a
# thread rotates its chunk with the matching chunk of the second half, by theta (FORWARD) or by -theta, and writes
# them where it read them. The angle is computed as MLX's own kernel computes it:
# position * 2^(-(d / half) log2 base).
_SOURCE = """
    constexpr uint32_t CHUNKS = HALF / 8;
    const uint32_t thread = blockIdx.x * blockDim.x + threadIdx.x;
    if (thread >= ROWS * CHUNKS) {
        return;
    }
    const uint32_t row = thread / CHUNKS;  // (batch, position, head), the projection's order
    const uint32_t chunk = thread - row * CHUNKS;
    const uint32_t position = (row / HEADS) % LENGTH;
    const size_t index = size_t(row) * (2 * HALF) + chunk * 8;
    constexpr int VECTORS = int(8 * sizeof(T) / sizeof(uint4));
    alignas(16) T first[8];
    alignas(16) T second[8];
    #pragma unroll
    for (int i = 0; i < VECTORS; ++i) {
        reinterpret_cast<uint4*>(first)[i] = reinterpret_cast<const uint4*>(x + index)[i];
        reinterpret_cast<uint4*>(second)[i] = reinterpret_cast<const uint4*>(x + index + HALF)[i];
    }
    #pragma unroll
    for (int i = 0; i < 8; ++i) {
        const float d = static_cast<float>(chunk * 8 + i) / static_cast<float>(HALF);
        const float theta = static_cast<float>(position) * exp2(-d * LOG2_BASE);
        const float c = cos(theta);
        const float s = sin(theta);
        const float x1 = static_cast<float>(first[i]);
        const float x2 = static_cast<float>(second[i]);
        if (FORWARD) {
            first[i] = static_cast<T>(x1 * c - x2 * s);
            second[i] = static_cast<T>(x1 * s + x2 * c);
        } else {
            first[i] = static_cast<T>(x2 * s + x1 * c);
            second[i] = static_cast<T>(x2 * c - x1 * s);
        }
    }
    #pragma unroll
    for (int i = 0; i < VECTORS; ++i) {
        reinterpret_cast<uint4*>(out + index)[i] = reinterpret_cast<const uint4*>(first)[i];
        reinterpret_cast<uint4*>(out + index + HALF)[i] = reinterpret_cast<const uint4*>(second)[i];
    }
"""


def rope_kernel_enabled() -> bool:
    """Whether the kernel may run here: on CUDA, unless `QLORA_ROPE=mlx`."""
    choice = os.environ.get("QLORA_ROPE", "kernel")
    if choice not in ("kernel", "mlx"):
        raise ValueError(f"QLORA_ROPE={choice!r} should be 'kernel' or 'mlx'")
    return choice == "kernel" and backend_name() == "cuda"


@functools.cache
def _kernel(base: float):
    log2_base = float(mx.array(math.log2(base), dtype=mx.float32).item())  # as MLX passes it: a float32
    bits = struct.unpack("<I", struct.pack("<f", log2_base))[0]
    return mx.fast.cuda_kernel(
        name=f"qlora_rope_rows_{bits:08x}",  # one kernel per base: MLX caches kernels by name
        input_names=["x"],
        output_names=["out"],
        source=f"    constexpr float LOG2_BASE = {log2_base.hex()}f;  // hexadecimal float: exact\n" + _SOURCE,
    )


def _rotate(x: mx.array, base: float, forward: bool) -> mx.array:
    """`(batch, length, heads, dim)` rows rotated (`forward`) or rotated back, in the same layout (made
    row-contiguous first where `x` is not)."""
    batch, length, heads, dim = x.shape
    rows = batch * length * heads
    (out,) = _kernel(base)(
        inputs=[x],
        template=[("T", x.dtype), ("ROWS", rows), ("LENGTH", length), ("HEADS", heads), ("HALF", dim // 2),
                  ("FORWARD", forward)],
        grid=(rows * (dim // 16), 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    )
    return out


@functools.cache
def _rotation(base: float):
    """`(batch, length, heads, dim)` rows -> their rotation's `(batch, heads, length, dim)` view, differentiable."""
    @mx.custom_function
    def rotate(x: mx.array) -> mx.array:
        return _rotate(x, base, forward=True).transpose(0, 2, 1, 3)

    @rotate.vjp
    def rotate_vjp(x, cotangent, output):  # one argument: MLX passes the array itself, not a tuple
        return _rotate(cotangent.transpose(0, 2, 1, 3), base, forward=False)

    return rotate


def kernel_applies(x: mx.array, rope: nn.RoPE, offset) -> bool:
    """The kernel's conditions: CUDA (and not switched off), `(batch, length, heads, dim)` input of a float dtype
    with the whole of `dim` (a multiple of 16) rotated in halves, unit scale, offset 0, 32-bit indices."""
    return (
        rope_kernel_enabled() and isinstance(offset, int) and offset == 0 and x.ndim == 4 and x.dtype in _DTYPES
        and rope.dims == x.shape[-1] and x.shape[-1] % 16 == 0 and not rope.traditional and rope.scale == 1.0
        and x.size < 2**31
    )


def rope_heads_first(x: mx.array, rope: nn.RoPE, offset=0) -> mx.array:
    """`rope(x.transpose(0, 2, 1, 3), offset=offset)` for `x` laid out `(batch, length, heads, dim)`: by this
    module's kernel where `kernel_applies`, else by `rope` itself."""
    if kernel_applies(x, rope, offset):
        return _rotation(float(rope.base))(x)
    return rope(x.transpose(0, 2, 1, 3), offset=offset)


__all__ = ["kernel_applies", "rope_heads_first", "rope_kernel_enabled"]
