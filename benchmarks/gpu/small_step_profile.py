"""Where a small training step's time goes (issue 12): one model build, then timed pieces of the step.

    python benchmarks/gpu/small_step_profile.py [--rows 4] [--seq 128] [overrides ...]   # default: 7B shape

Prints one table (median milliseconds of 5 synchronized runs after 2 untimed ones) and writes it as JSON to
$OUT/small_step_profile.json when OUT is set:
- the whole compiled step (`TrainStep`) at several row counts, for the fixed cost per step and the cost per token;
- its parts: the compiled gradients alone, the compiled update alone, the compiled loss alone (forward);
- host time: building the step's graph (calling the compiled functions without evaluating) against the
  evaluation, and the node count of the uncompiled gradient graph (an upper bound on kernels per step);
- one decoder layer's forward and forward + backward, times the number of layers;
- dequantizing one layer's seven weights, times the number of layers;
- the quantized path chosen per token count against the others (every `QuantizedLinear` forced to each);
- the per-kernel cost of the backend: a chain of small element-wise kernels, uncompiled.
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import models  # noqa: F401,E402  (fast BLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from benchmarks.gpu.profile_table import ProfileTable, median_ms  # noqa: E402
from harness.bench import compose  # noqa: E402
from harness.bench_timing import synthetic_tokens  # noqa: E402
from harness.build import build_model, build_optimizer  # noqa: E402
from harness.step.loss import causal_lm_loss  # noqa: E402
from harness.step.standard import TrainStep  # noqa: E402
from models.quant import QuantizedLinear  # noqa: E402


def batch_of(rows: int, seq: int, vocab: int, seed: int = 0) -> dict:
    tokens = synthetic_tokens(rows, seq, vocab, seed=seed)
    return {"input_ids": tokens, "labels": tokens, "attention_mask": mx.ones_like(tokens)}


def graph_operations(outputs) -> collections.Counter:
    """Operations of the (unevaluated) graph behind `outputs`, counted by primitive, from MLX's DOT export."""
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *outputs)
        labels = [re.search(r'label\s*=\s*"([^"]*)"', line) for line in open(f.name) if "->" not in line]
    return collections.Counter(m.group(1).split()[0] for m in labels if m and not m.group(1).startswith("{"))


def kernel_chain_us(n: int = 2000) -> float:
    """Microseconds per kernel of `n` dependent small element-wise kernels, uncompiled."""
    x = mx.ones((1024,))
    mx.eval(x)

    def chain():
        y = x
        for _ in range(n):
            y = y * 1.0001
        mx.eval(y)

    return median_ms(chain) * 1e3 / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", default=["model=mistral-7b-shape", "quant=rowwise4"])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--row-counts", default="1,2,4,8,16")
    parser.add_argument("--tag", default="", help="appended to the JSON file's name")
    options = parser.parse_args()
    cfg = compose([*options.overrides, "trainer.cpu_streams=1"])
    rows, seq = options.rows, options.seq
    table = ProfileTable(width=58)
    record = table.record

    print(f"device {mx.default_device()}, overrides {options.overrides}, {rows}x{seq}", flush=True)
    record("per small kernel, uncompiled chain (us)", kernel_chain_us())
    model = build_model(cfg, progress=False)
    optimizer = build_optimizer(cfg.optim, model, total_steps=1000)
    args = model.args
    layers = len(model.model.layers)
    mx.eval(model.parameters())
    model.train()
    step = TrainStep(model, optimizer, grad_clip=cfg.optim.grad_clip)
    batch = batch_of(rows, seq, args.vocab_size)

    def whole_step(b=batch):
        mx.eval(step([b]), model.trainable_parameters(), optimizer.state)

    # The batch's own row count among the others (one row of the table each).
    for r in sorted({rows, *(int(x) for x in options.row_counts.split(","))}):
        b = batch_of(r, seq, args.vocab_size, seed=r)
        record(f"step {r}x{seq} (ms)", median_ms(lambda b=b: whole_step(b)))
    # Parts of the step.
    record("gradients only, compiled (ms)", median_ms(lambda: mx.eval(step._gradients(batch))))
    _, n_tokens, grads = step._gradients(batch)
    mx.eval(n_tokens, grads)
    record("update only, compiled (ms)", median_ms(
        lambda: mx.eval(step._update(grads, n_tokens), model.trainable_parameters(), optimizer.state)))
    loss = mx.compile(lambda b: causal_lm_loss(model, b), inputs=[model.state])
    record("loss forward only, compiled, train mode (ms)", median_ms(lambda: mx.eval(loss(batch))))
    # Host time: calling the compiled functions (no evaluation) vs the whole step.
    record("host: calling the compiled gradients, no evaluation (ms)",
           median_ms(lambda: step._gradients(batch), warmup=1, repeat=5))
    record("host: calling the compiled update, no evaluation (ms)",
           median_ms(lambda: step._update(grads, n_tokens), warmup=1, repeat=5))
    build_times, eval_times = [], []
    for _ in range(5):
        start = time.perf_counter()
        outputs = step([batch])
        built = time.perf_counter()
        mx.eval(outputs, model.trainable_parameters(), optimizer.state)
        build_times.append(built - start)
        eval_times.append(time.perf_counter() - built)
    record("step: graph building on the host (ms)", statistics.median(build_times) * 1e3)
    record("step: evaluation (ms)", statistics.median(eval_times) * 1e3)
    (_, _), grads_uncompiled = nn.value_and_grad(model, causal_lm_loss)(model, batch)
    operations = graph_operations([g for _, g in tree_flatten(grads_uncompiled)])
    record("nodes of the uncompiled gradient graph", sum(operations.values()))
    for name, count in operations.most_common(12):
        record(f"  of which {name}, per layer", count / layers)
    del grads_uncompiled
    # One decoder layer at this batch's shape.
    layer = model.model.layers[0]
    h = mx.random.normal((rows, seq, args.hidden_size)).astype(model.dtype)
    probe = mx.random.normal(h.shape).astype(h.dtype)
    forward = mx.compile(lambda x: layer(x, "causal"))
    record(f"one layer forward x{layers} (ms)", median_ms(lambda: mx.eval(forward(h))) * layers)
    layer_grad = mx.compile(nn.value_and_grad(layer, lambda x: (layer(x, "causal") * probe).sum()))
    record(f"one layer forward + backward x{layers} (ms)", median_ms(lambda: mx.eval(layer_grad(h))) * layers)
    quantized = [m for _, m in layer.named_modules() if isinstance(m, QuantizedLinear)]
    dequant = mx.compile(lambda: [q.dequantize(h.dtype) for q in quantized])
    record(f"dequantize one layer's {len(quantized)} weights x{layers} (ms)",
           median_ms(lambda: mx.eval(dequant())) * layers)
    # The quantized path forced one way, then the other (the step is rebuilt so that it recompiles).
    every_quantized = [m for _, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for path in ("fused", "dequantize", "dequantize_saved"):
        for m in every_quantized:
            m.forward_path = path
        forced = TrainStep(model, optimizer, grad_clip=cfg.optim.grad_clip)
        record(f"step {rows}x{seq}, every QuantizedLinear {path} (ms)", median_ms(
            lambda: mx.eval(forced([batch]), model.trainable_parameters(), optimizer.state)))
    for m in every_quantized:
        m.forward_path = "auto"
    table.write(f"small_step_profile{options.tag}", overrides=options.overrides, rows=rows, seq=seq)


if __name__ == "__main__":
    main()
