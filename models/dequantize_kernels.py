"""A dequantization kernel of our own for CUDA: 4-bit affine codes to dense weights at the memory's speed.

Why: a small training step rebuilds every frozen weight twice (forward and backward), and on an H200 MLX's own
`mx.dequantize` took about 0.8 ms per 7B decoder layer, a third of a 4 x 128 step (BENCHMARKS.md, "Where a small
step's time goes"): its CUDA kernel gives each thread one byte of codes and writes two values at a time. Here each
thread expands one 32-bit word (eight codes) and writes its eight values with one 16-byte store, so a warp reads
128 consecutive bytes and writes 512; scales and biases are read where they are stored, one per row (row-wise) or
per group, in their own dtype, with no broadcast or cast beforehand. The shape is compiled into the kernel (its
index divisions become multiplications): a model compiles one kernel per weight shape, once (MLX caches them).

Layout as `models.quant`'s affine schemes (MLX's): codes low bits first, `w = scale * q + bias` per group of inputs,
computed in float32 and rounded once to the output dtype. Only CUDA runs it (`affine_dequantize_4bit` answers None
elsewhere, and the caller uses `mx.dequantize` or plain arithmetic); `QLORA_DEQUANTIZE=mlx` turns it off.
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx

from models.backend import backend_name

# Which dequantization 4-bit affine weights get on each backend: "kernel" (this module's) or "mlx" (`mx.dequantize`).
DEQUANTIZERS = {"cuda": "kernel"}
_OUTPUT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)

_SOURCE = """
    // WORDS: words of codes in all; WORDS_PER_ROW, WORDS_PER_GROUP: compile-time constants, so that the divisions
    // below are multiplications; 32-bit indices (the caller checks that they suffice).
    const uint32_t word = blockIdx.x * blockDim.x + threadIdx.x;
    if (word >= WORDS) {
        return;
    }
    const uint32_t row = word / WORDS_PER_ROW;
    const uint32_t group = row * (WORDS_PER_ROW / WORDS_PER_GROUP) + (word - row * WORDS_PER_ROW) / WORDS_PER_GROUP;
    const float scale = static_cast<float>(scales[group]);
    const float bias = static_cast<float>(biases[group]);
    const uint32_t codes = w[word];
    alignas(16) unsigned char expanded[8 * sizeof(T)];
    #pragma unroll
    for (int i = 0; i < 8; ++i) {
        const T value = static_cast<T>(scale * static_cast<float>((codes >> (4 * i)) & 0xFu) + bias);
        memcpy(expanded + i * sizeof(T), &value, sizeof(T));
    }
    uint4* destination = reinterpret_cast<uint4*>(out + size_t(word) * 8);
    #pragma unroll
    for (int i = 0; i < int(8 * sizeof(T) / sizeof(uint4)); ++i) {
        destination[i] = reinterpret_cast<const uint4*>(expanded)[i];
    }
"""


def dequantizer() -> str:
    """"kernel" or "mlx": how 4-bit affine weights are dequantized here (`DEQUANTIZERS`, `QLORA_DEQUANTIZE`)."""
    choice = os.environ.get("QLORA_DEQUANTIZE") or DEQUANTIZERS.get(backend_name(), "mlx")
    if choice not in ("kernel", "mlx"):
        raise ValueError(f"QLORA_DEQUANTIZE={choice!r} should be 'kernel' or 'mlx'")
    return choice


@functools.cache
def _kernel():
    return mx.fast.cuda_kernel(
        name="qlora_affine_dequantize_4bit",
        input_names=["w", "scales", "biases"],
        output_names=["out"],
        source=_SOURCE,
    )


def affine_dequantize_4bit(packed: mx.array, scales: mx.array, biases: mx.array, dtype: mx.Dtype) -> mx.array | None:
    """Dense `(rows, words * 8)` in `dtype` from 4-bit codes `packed` uint32 `(rows, words)` and per-group `scales`,
    `biases` `(rows, groups)` (groups dividing the row into whole words), by this module's CUDA kernel; None where
    it does not run (another backend, `QLORA_DEQUANTIZE=mlx`, other shapes or dtypes): then dequantize otherwise."""
    if dequantizer() != "kernel" or backend_name() != "cuda" or dtype not in _OUTPUT_DTYPES:
        return None
    if packed.ndim != 2 or packed.dtype != mx.uint32 or scales.shape != biases.shape or scales.ndim != 2:
        return None
    rows, words = packed.shape
    groups = scales.shape[1]
    if scales.shape[0] != rows or words % groups or scales.dtype not in _OUTPUT_DTYPES or rows * words >= 2**31:
        return None
    (out,) = _kernel()(
        inputs=[packed, scales, biases.astype(scales.dtype)],
        template=[
            ("T", dtype), ("WORDS", rows * words), ("WORDS_PER_ROW", words), ("WORDS_PER_GROUP", words // groups)
        ],
        grid=(rows * words, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(rows, words * 8)],
        output_dtypes=[dtype],
    )
    return out


__all__ = ["DEQUANTIZERS", "affine_dequantize_4bit", "dequantizer"]
