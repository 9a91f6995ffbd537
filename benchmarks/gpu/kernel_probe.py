"""Time the pieces of a 7B training step on one weight shape: dequantization variants, the dense matmul, LoRA.

    python -m benchmarks.gpu.kernel_probe [--tokens 4096] [--out 14336] [--in 4096]

Each line is the median of 20 synchronized runs (compiled functions, bf16). It answers where the step's
non-matmul time goes (BENCHMARKS.md, issue 5) without a profiler.
"""

from __future__ import annotations

import argparse
import statistics
import time

import models  # noqa: F401, I001  (loads the fast BLAS before MLX)
import mlx.core as mx
import mlx.nn as nn

from models.lora import LoRALinear
from models.quant import QuantizedLinear, QuantSpec, _affine_dequantize


def timed(fn, *args, repeat: int = 20) -> float:
    mx.eval(fn(*args))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", dest="out_features", type=int, default=14336)
    parser.add_argument("--in", dest="in_features", type=int, default=4096)
    o = parser.parse_args()
    dense = nn.Linear(o.in_features, o.out_features, bias=False)
    dense.set_dtype(mx.bfloat16)
    layer = QuantizedLinear.from_linear(dense, QuantSpec("rowwise"))
    mx.eval(dense.parameters(), layer.parameters())
    x = mx.random.normal((o.tokens, o.in_features)).astype(mx.bfloat16)
    g = mx.random.normal((o.tokens, o.out_features)).astype(mx.bfloat16)
    w = dense.weight
    packed, scales, biases = layer.weight, layer.scales, layer.biases
    scales_c = mx.contiguous(mx.broadcast_to(scales, (o.out_features, o.in_features // 64)))
    biases_c = mx.contiguous(mx.broadcast_to(biases, (o.out_features, o.in_features // 64)))
    mx.eval(scales_c, biases_c)
    moved = (packed.nbytes + o.out_features * o.in_features * 2) / 1e9
    rows = {
        "dequantize, broadcast f32 params (ours)": mx.compile(
            lambda: _affine_dequantize(packed, scales, biases, 4, mx.bfloat16)),
        "dequantize, contiguous f32 params": mx.compile(
            lambda: mx.dequantize(packed, scales_c, biases_c, group_size=64, bits=4, dtype=mx.bfloat16)),
        "dequantize, contiguous bf16 params": mx.compile(
            lambda: mx.dequantize(packed, scales_c.astype(mx.bfloat16), biases_c.astype(mx.bfloat16),
                                  group_size=64, bits=4)),
        "dequantize, elementwise unpack": mx.compile(
            lambda: _affine_dequantize(packed, scales, biases, 4, mx.bfloat16, native=False)),
        "matmul x @ W^T (dense bf16)": mx.compile(lambda: x @ w.T),
        "matmul g @ W (dense bf16)": mx.compile(lambda: g @ w),
        "dequantize + matmul (ours, forward)": mx.compile(lambda: layer(x)),
        "quantized_matmul (fused)": mx.compile(
            lambda: mx.quantized_matmul(x, packed, scales_c.astype(mx.bfloat16), biases_c.astype(mx.bfloat16),
                                        transpose=True, group_size=64, bits=4)),
    }
    lora = LoRALinear(layer, rank=8)
    lora.lora_B = 0.01 * mx.random.normal(lora.lora_B.shape)
    mx.eval(lora.parameters())
    base_grad = mx.compile(mx.grad(lambda x: (layer(x) * g).astype(mx.float32).sum()))
    lora_grad = mx.compile(nn.value_and_grad(lora, lambda x: (lora(x) * g).astype(mx.float32).sum()))
    rows["base forward + backward (dx)"] = lambda: base_grad(x)
    rows["LoRA r=8 on it, forward + backward (dx, dA, dB)"] = lambda: lora_grad(x)
    print(f"shape: x ({o.tokens}, {o.in_features}) @ W ({o.out_features}, {o.in_features})^T, bf16; "
          f"dequantize moves {moved:.3f} GB")
    for name, fn in rows.items():
        ms = timed(fn)
        print(f"{name:52s} {ms:8.3f} ms")


if __name__ == "__main__":
    main()
