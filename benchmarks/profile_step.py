"""Where one CPU stream's share of a training step goes: the decoder layers vs the LM head and cross-entropy.

Measures CPU time (`time.process_time`, one BLAS thread, one stream), not wall time, so that the numbers stay
comparable on a machine shared with other work; variants run alternately, several rounds, medians reported.

    python benchmarks/profile_step.py [--rows 4] [--seq 128] [--rounds 3] [overrides ...]

Prints: the rate of one representative one-thread matmul (the layer's widest, tokens x hidden x intermediate);
per decoder layer (forward + backward, from a 2-layer model of the same shape) with row-wise 4-bit + LoRA on all
seven projections, without quantization, and with LoRA on q_proj only; the LM head + chunked cross-entropy at
several (chunk, vocabulary block) sizes; each with its share of an estimate of the whole step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import models  # noqa: F401,E402  (fast BLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from harness.bench import compose  # noqa: E402
from harness.build import build_model  # noqa: E402
from harness.step.loss import lm_head_weight  # noqa: E402
from models import blas  # noqa: E402
from models.cross_entropy import default_vocab_block, linear_cross_entropy  # noqa: E402


def cpu_ms(fn) -> float:
    """CPU milliseconds of one call of `fn` (which must synchronize), after one untimed call."""
    fn()
    start = time.process_time()
    fn()
    return (time.process_time() - start) * 1e3


def layer_step(overrides: list[str], rows: int, seq: int):
    """A compiled forward + backward of a 2-layer body of the configured shape, vocabulary cut to 512."""
    cfg = compose([*overrides, "trainer.cpu_streams=1", "model.arch.num_hidden_layers=2", "model.arch.vocab_size=512"])
    model = build_model(cfg, progress=False)
    model.train()
    ids = mx.random.randint(3, 512, (rows, seq)).astype(mx.int32)
    probe = mx.random.normal((rows, seq, model.args.hidden_size))
    value_and_grad = nn.value_and_grad(model, lambda m, x: (m.model(x) * probe).sum())
    step = mx.compile(lambda x: value_and_grad(model, x), inputs=[model.state], outputs=[model.state])
    return lambda: mx.eval(step(ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", default=["model=smollm2-135m-shape"])
    parser.add_argument("--rows", type=int, default=4, help="rows of one stream's share (8 rows on 2 streams: 4)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    blas.set_blas_threads(1)  # as each of the CPU streams runs
    overrides = options.overrides
    cfg = compose(overrides)
    args = cfg.model.arch
    tokens = options.rows * (options.seq - 1)

    a = mx.random.normal((tokens, args.hidden_size))
    b = mx.random.normal((args.intermediate_size, args.hidden_size))
    mx.eval(a, b)
    matmul_ms = statistics.median(cpu_ms(lambda: mx.eval(a @ b.T)) for _ in range(5))
    rate = 2 * tokens * args.hidden_size * args.intermediate_size / matmul_ms / 1e6
    print(f"one-thread matmul {tokens}x{args.hidden_size}x{args.intermediate_size}: {matmul_ms:.1f} ms, "
          f"{rate:.1f} GFLOP/s")

    layer_variants = {
        "layer, rowwise4 + LoRA x7": overrides,
        "layer, no quantization + LoRA x7": [*overrides, "quant=none"],
        "layer, rowwise4 + LoRA on q_proj": [*overrides, "lora.target_modules=[q_proj]"],
    }
    model = build_model(compose([*overrides, "model.arch.num_hidden_layers=1"]), progress=False)
    head = lm_head_weight(model)
    hidden = mx.random.normal((tokens, args.hidden_size))
    labels = mx.random.randint(3, args.vocab_size, (tokens,)).astype(mx.int32)
    mx.eval(head, hidden, labels)
    default_block = default_vocab_block(256, args.vocab_size)
    head_variants = {}
    for chunk, block in [(256, default_block), (256, 4096), (512, 2048), (128, 8192), (512, args.vocab_size)]:
        grad = mx.compile(mx.grad(lambda h, c=chunk, v=block: linear_cross_entropy(
            h, head, labels, chunk_size=c, vocab_block=v)[0]))
        head_variants[f"head + loss, chunk {chunk}, vocab block {block}"] = lambda g=grad: mx.eval(g(hidden))
    fns = {name: layer_step(ov, options.rows, options.seq) for name, ov in layer_variants.items()}
    fns.update(head_variants)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(options.rounds):  # alternate, so that load changes hit every variant alike
        for name, fn in fns.items():
            times[name].append(cpu_ms(fn) / (2 if name.startswith("layer") else 1))
    layer_flops = 2 * 2 * tokens * args.hidden_size * (2 * args.hidden_size + 2 * args.hidden_size
                                                        * args.num_key_value_heads // args.num_attention_heads
                                                        + 3 * args.intermediate_size)
    head_flops = 2 * 2 * tokens * args.hidden_size * args.vocab_size
    layer_ms = statistics.median(times["layer, rowwise4 + LoRA x7"])
    head_ms = statistics.median(times[next(iter(head_variants))])
    step_ms = args.num_hidden_layers * layer_ms + head_ms
    print(f"{'part (one stream, ' + str(tokens) + ' tokens)':52s} {'CPU ms':>8s} {'x matmul time':>14s} rounds")
    for name, values in times.items():
        flops = layer_flops if name.startswith("layer") else head_flops
        ms = statistics.median(values)
        print(f"{name:52s} {ms:8.1f} {ms / (flops / rate / 1e6):14.2f} {[round(v) for v in values]}")
    print(f"step estimate: {args.num_hidden_layers} layers {args.num_hidden_layers * layer_ms:.0f} ms "
          f"({args.num_hidden_layers * layer_ms / step_ms:.0%}), head + loss {head_ms:.0f} ms ({head_ms / step_ms:.0%})")


if __name__ == "__main__":
    main()
