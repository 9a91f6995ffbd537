"""Peak memory and time of one LoRA adapter's down projection under dropout, forward + backward, per variant.

    python benchmarks/gpu/dropout_probe.py [--shape 4 512 14336] [--rank 16]

x `(B, L, in)` in bfloat16 (down_proj's input at the flagship's 4 x 512), `a (rank, in)`; the loss is the sum of
`dropout(x) @ a^T` times a fixed random cotangent; gradients with respect to x and a, as one compiled function.
Each variant runs in a fresh process (its peak is its own): memory above the inputs, and the median time.
Variants: no dropout; `mx.random.bernoulli` mask times x (plain autograd); the project's `LoRALinear` path
(models/lora.py) with each of its mask draws; the hash mask through plain autograd.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

VARIANTS = ("none", "bernoulli", "project_hash", "project_bernoulli", "hash_autograd")


def measure(variant: str, shape: tuple[int, ...], rank: int) -> dict:
    import os

    if variant.startswith("project_"):
        os.environ["QLORA_DROPOUT_DRAW"] = variant.removeprefix("project_")
    import models  # noqa: F401  (BLAS first)
    import mlx.core as mx

    from models.lora import _dropout_down_projection, _uniform_bits, dropout_draw, dropout_keep_threshold

    p = 0.05
    x = mx.random.normal(shape).astype(mx.bfloat16)
    a = (mx.random.normal((rank, shape[-1])) * 0.01).astype(mx.bfloat16)
    cot = mx.random.normal((*shape[:-1], rank)).astype(mx.bfloat16)
    key = mx.random.key(1)
    mx.eval(x, a, cot, key)

    def down(x, a, key):
        if variant == "none":
            return x @ a.T
        if variant == "bernoulli":
            return ((mx.random.bernoulli(1 - p, x.shape, key=key) * x) * (1 / (1 - p))) @ a.T
        if variant.startswith("project_"):
            return _dropout_down_projection(dropout_keep_threshold(p), dropout_draw())(x, a, key)
        mask = _uniform_bits(key, x.shape) < dropout_keep_threshold(p)
        return (mx.where(mask, x, 0) @ a.T) * (1 / (1 - p))

    def loss(x, a, key):
        return (down(x, a, key) * cot).astype(mx.float32).sum()

    step = mx.compile(mx.grad(loss, argnums=(0, 1)))
    mx.eval(step(x, a, key))
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    times = []
    for i in range(5):
        start = time.perf_counter()
        mx.eval(step(x, a, mx.random.key(i)))
        mx.synchronize()
        times.append(time.perf_counter() - start)
    return {"variant": variant, "extra_peak_mb": (mx.get_peak_memory() - base) / 1e6,
            "x_mb": x.nbytes / 1e6, "ms": statistics.median(times) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 512, 14336])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--variant", choices=VARIANTS)
    options = parser.parse_args()
    if options.variant:
        print(json.dumps(measure(options.variant, tuple(options.shape), options.rank)))
        return
    print(f"| variant | extra peak MB | x MB | ms |\n|---|---|---|---|")
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--shape", *map(str, options.shape),
                              "--rank", str(options.rank)], capture_output=True, text=True)
        if out.returncode:
            print(f"| {variant} | failed: {out.stderr.strip().splitlines()[-1:]} | | |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {variant} | {r['extra_peak_mb']:.0f} | {r['x_mb']:.0f} | {r['ms']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
