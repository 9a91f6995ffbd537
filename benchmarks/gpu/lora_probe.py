"""What a LoRA branch costs at a large step's token count, piece by piece (issue 12's 8 x 512 target).

    python benchmarks/gpu/lora_probe.py [--tokens 4096] [--rank 8] [--hidden 4096] [--kv 1024] [--ffn 14336]

`large_step_profile.py` found a 7B decoder layer's forward + backward at 8 x 512 tokens 1.8 ms slower with its
seven rank-8 adapters than without; their products are tiny next to the frozen weights' (rank 8 against 4,096),
so the question is which of the branch's kernels (two thin products forward, four backward, the casts, the sums
into the frozen path's output and input gradient) take the time, and whether another form of the same
arithmetic takes less. For each of the seven projections of the shape (in, out), on bfloat16 operands of
`--tokens` rows: each piece alone, repeated `--reps` times in one evaluation (one synchronization for all); then
the frozen path's two products for scale. Timed from the host: where a kernel is shorter than the host's cost of
issuing it, that cost is what this measures (on an H200, 30-60 us a piece whatever its size: BENCHMARKS.md,
"Session 10"); `kernel_trace.py` gives the GPU's own times. Prints microseconds per
piece and projection, then their sum over a layer times 32 layers (ms), and writes $OUT/lora_probe.json.

Pieces (x (T, in) the input, dy (T, out) the output's gradient, A (r, in), B (out, r), z = x A^T, g = dy B):
down `x @ A^T`; up `addmm(y, z, B^T)`; g `dy @ B`; dB `z^T @ dy` (as autograd forms it); dA `g^T @ x`;
dx `g @ A`; dx sum `dx_frozen + dx`; dx fused `addmm(dx_frozen, g, A)`; dA and dB split over `--split` row blocks
(a batched product, then a sum): the reduction over T shared among more thread blocks; branch vjp: autograd's
backward of the whole branch (float32 adapters cast, compiled); frozen fwd / bwd: `x @ W^T`, `dy @ W`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import models  # noqa: F401,E402  (fast BLAS before mlx)
import mlx.core as mx  # noqa: E402

from benchmarks.gpu.profile_table import median_ms  # noqa: E402


def microseconds_per_call(make, reps: int) -> float:
    """`make()` (which builds fresh, unevaluated arrays) called `reps` times and evaluated together: microseconds a
    call, median of 5 synchronized evaluations after one untimed (`profile_table.median_ms`)."""
    return median_ms(lambda: mx.eval([make() for _ in range(reps)]), warmup=1) * 1e3 / reps


def split_rows(left: mx.array, right: mx.array, blocks: int) -> mx.array:
    """`left^T @ right` for left (T, a), right (T, b), the sum over T cut into `blocks` batched products."""
    rows = left.shape[0]
    left = left.reshape(blocks, rows // blocks, -1).transpose(0, 2, 1)
    return (left @ right.reshape(blocks, rows // blocks, -1)).sum(axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--kv", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--split", type=int, default=8)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=32)
    options = parser.parse_args()
    tokens, rank, dtype, reps = options.tokens, options.rank, mx.bfloat16, options.reps
    hidden, kv, ffn = options.hidden, options.kv, options.ffn
    projections = {"q": (hidden, hidden), "k": (hidden, kv), "v": (hidden, kv), "o": (hidden, hidden),
                   "gate": (hidden, ffn), "up": (hidden, ffn), "down": (ffn, hidden)}
    print(f"device {mx.default_device()}, {tokens} tokens, rank {rank}, bfloat16", flush=True)
    table: dict[str, dict[str, float]] = {}
    for name, (fan_in, fan_out) in projections.items():
        def normal(*shape):
            return mx.random.normal(shape).astype(dtype)

        x, dy, y, dx_frozen = normal(tokens, fan_in), normal(tokens, fan_out), normal(tokens, fan_out), normal(
            tokens, fan_in)
        a, b, z, g = normal(rank, fan_in), normal(fan_out, rank), normal(tokens, rank), normal(tokens, rank)
        w = normal(fan_out, fan_in)
        a32, b32 = a.astype(mx.float32), b.astype(mx.float32)
        mx.eval(x, dy, y, dx_frozen, a, b, z, g, w, a32, b32)

        def branch(y, x, a32, b32):
            return mx.addmm(y, x @ a32.astype(x.dtype).T, b32.astype(x.dtype).T, alpha=2.0)

        branch_vjp = mx.compile(lambda y, x, a32, b32: mx.vjp(branch, [y, x, a32, b32], [dy])[1])
        pieces = {
            "down": lambda: x @ a.T,
            "up": lambda: mx.addmm(y, z, b.T, alpha=2.0),
            "g": lambda: dy @ b,
            "dB": lambda: z.T @ dy,
            "dA": lambda: g.T @ x,
            "dx": lambda: g @ a,
            "dx sum": lambda: dx_frozen + g @ a,
            "dx fused": lambda: mx.addmm(dx_frozen, g, a),
            "dA split": lambda: split_rows(g, x, options.split),
            "dB split": lambda: split_rows(z, dy, options.split),
            "branch vjp": lambda: branch_vjp(y, x, a32, b32),
            "frozen fwd": lambda: x @ w.T,
            "frozen bwd": lambda: dy @ w,
        }
        table[name] = {piece: microseconds_per_call(make, reps) for piece, make in pieces.items()}
        print(f"{name:>5} " + "  ".join(f"{piece} {us:7.1f}" for piece, us in table[name].items()), flush=True)
    print(f"\nper layer x{options.layers} (ms):")
    totals = {piece: sum(row[piece] for row in table.values()) * options.layers / 1e3 for piece in table["q"]}
    for piece, ms in totals.items():
        print(f"  {piece:<12} {ms:8.2f}")
    out = os.environ.get("OUT")
    if out:
        Path(out, "lora_probe.json").write_text(json.dumps(
            {"device": str(mx.default_device()), "tokens": tokens, "rank": rank, "us": table, "layer_ms": totals},
            indent=1))


if __name__ == "__main__":
    main()
