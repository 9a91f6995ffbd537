"""Our CUDA dequantization kernel (`models.dequantize_kernels`) against MLX's `mx.dequantize`: same numbers, speed.

    python benchmarks/gpu/dequantize_probe.py

Checks the kernel's output against the plain float32 reference (`native=False`) for row-wise and group-wise
4-bit weights of the 7B and SmolLM2 shapes in float32, float16 and bfloat16 (at most one rounding apart), then
times one 14336 x 4096 weight and one 7B decoder layer's seven weights both ways (median of 20 synchronized runs)
and prints the rate in GB/s of bytes read and written. Exits non-zero when a check fails. Writes the table as JSON
to $OUT/dequantize_probe.json when OUT is set.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import models  # noqa: F401,E402  (fast BLAS before mlx)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from harness.bench_timing import timed_runs  # noqa: E402
from models.quant import _affine_dequantize, quantize_group, quantize_rowwise  # noqa: E402

LAYER_7B = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]


def quantized(shape, scheme: str, seed: int = 0):
    w = mx.random.normal(shape, key=mx.random.key(seed)) * 0.02
    if scheme == "rowwise":
        packed, scales, zeros = quantize_rowwise(w)
        return packed, scales, -scales * zeros
    return quantize_group(w, group_size=int(scheme.removeprefix("group")))


def check(shape, scheme: str, dtype) -> float:
    packed, scales, biases = quantized(shape, scheme)
    os.environ["QLORA_DEQUANTIZE"] = "kernel"
    ours = _affine_dequantize(packed, scales, biases, 4, dtype)
    reference = _affine_dequantize(packed, scales, biases, 4, mx.float32, native=False)
    ours32, reference32 = np.array(ours.astype(mx.float32)), np.array(reference)
    rounded = np.array(reference.astype(dtype).astype(mx.float32))
    one_rounding = np.abs(rounded - reference32).max() * 1.01 + 1e-7  # what rounding to `dtype` may cost
    error = float(np.abs(ours32 - reference32).max())
    status = "ok" if error <= one_rounding else "FAIL"
    print(f"check {scheme:<8} {str(shape):<14} {str(dtype):<14} max |ours - float32| {error:.3g} "
          f"(one rounding {one_rounding:.3g}) {status}", flush=True)
    return error <= one_rounding


def time_ms(arrays, dtype, how: str) -> float:
    os.environ["QLORA_DEQUANTIZE"] = how

    def run():
        mx.eval([_affine_dequantize(p, s, b, 4, dtype) for p, s, b in arrays])

    return statistics.median(timed_runs(run, warmup=3, repeat=20)) * 1e3


def main() -> None:
    print(f"device {mx.default_device()}", flush=True)
    ok = all(check(shape, scheme, dtype)
             for shape in [(576, 576), (1536, 576), (1024, 4096), (14336, 4096), (4096, 14336)]
             for scheme in ("rowwise", "group64", "group32")
             for dtype in (mx.float32, mx.float16, mx.bfloat16))
    table = {}
    for label, shapes in [("14336 x 4096", [(14336, 4096)]), ("7B layer, 7 weights", LAYER_7B)]:
        for scheme in ("rowwise", "group64"):
            arrays = [quantized(shape, scheme, seed=i) for i, shape in enumerate(shapes)]
            mx.eval(arrays)
            moved = sum(p.nbytes + s.nbytes + b.nbytes + p.size * 8 * 2 for p, s, b in arrays)  # read + bf16 write
            for how in ("mlx", "kernel"):
                ms = time_ms(arrays, mx.bfloat16, how)
                table[f"{label}, {scheme}, {how}"] = ms
                print(f"time {label:<20} {scheme:<8} {how:<7} {ms:8.3f} ms {moved / ms / 1e6:8.0f} GB/s", flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "dequantize_probe.json").write_text(json.dumps({"ok": ok, "ms": table}, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
