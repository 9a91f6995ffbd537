"""Peak memory of one training micro-batch with and without LoRA adapter dropout, on a small Mistral shape.

    nice -n 19 python -m benchmarks.dropout_memory                       # the table below, one process per row
    nice -n 19 python -m benchmarks.dropout_memory --label main          # run with PYTHONPATH at another tree

Builds the flagship experiment (`experiment=mistral7b_dolly_qlora`: row-wise 4-bit, LoRA r=16 on all seven
projections) on a small Mistral shape with random weights (hidden 1024, intermediate 3584, 4 layers, 8 heads /
2 KV heads, vocab 4096 by default), then for each row runs one optimizer step of one micro-batch of
`--batch` x `--seq` tokens as a warm-up (compilation), then `--repeat` more measured: `mx.get_peak_memory()` over
them and their median seconds. Rows: the layer-by-layer checkpointed step (`LayerwiseTrainStep`, as the experiment runs it,
and with `keep_dense=False`) and the standard `TrainStep` without checkpointing, each with dropout 0 and
`--dropout`. Every row runs in a fresh process so its peak is its own. Memory is the point; times on a shared
CPU are indicative only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

ROWS = [  # (step, dropout on, keep_dense)
    ("layerwise", False, True),
    ("layerwise", True, True),
    ("layerwise", False, False),
    ("layerwise", True, False),
    ("standard", False, True),
    ("standard", True, True),
]


def shape_overrides(options: argparse.Namespace) -> list[str]:
    return [
        "experiment=mistral7b_dolly_qlora",
        "model=mistral-7b-shape",
        f"model.arch.hidden_size={options.hidden}",
        f"model.arch.intermediate_size={options.intermediate}",
        f"model.arch.num_hidden_layers={options.layers}",
        "model.arch.num_attention_heads=8",
        "model.arch.num_key_value_heads=2",
        f"model.arch.vocab_size={options.vocab}",
    ]


def measure_one(options: argparse.Namespace) -> dict:
    import models  # noqa: F401  (loads the fast BLAS before MLX)
    import mlx.core as mx

    from harness.bench import compose
    from harness.bench_timing import synthetic_tokens
    from harness.build import build_model, build_optimizer
    from harness.step.layerwise import LayerwiseTrainStep
    from harness.step.standard import TrainStep

    step_kind, dropout, keep_dense = options.one.split(",")
    overrides = shape_overrides(options) + [
        f"lora.dropout={options.dropout if dropout == '1' else 0.0}",
        f"trainer.gradient_checkpointing={'true' if step_kind == 'layerwise' else 'false'}",
    ]
    cfg = compose(overrides)
    model = build_model(cfg, progress=False)
    mx.eval(model.parameters())
    optimizer = build_optimizer(cfg.optim, model, total_steps=100)
    if step_kind == "layerwise":
        step = LayerwiseTrainStep(model, optimizer, grad_clip=cfg.optim.grad_clip, keep_dense=keep_dense == "1")
    else:
        step = TrainStep(model, optimizer, grad_clip=cfg.optim.grad_clip)
    model.train()
    tokens = synthetic_tokens(options.batch, options.seq, model.args.vocab_size)
    batch = {"input_ids": tokens, "labels": tokens}

    def run():
        mx.eval(step([batch]), model.trainable_parameters(), optimizer.state)

    run()  # compiles
    mx.eval(optimizer.state)
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    seconds = []
    for _ in range(options.repeat):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return {"base_gb": base / 1e9, "peak_gb": mx.get_peak_memory() / 1e9, "seconds": statistics.median(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3584)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--repeat", type=int, default=1, help="measured steps; seconds: their median")
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--rows", nargs="*", help="step,dropout(0|1),keep_dense(0|1); default: all")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.one:
        print(json.dumps(measure_one(options)))
        return
    rows = [tuple(r.split(",")) for r in options.rows] if options.rows else [
        (s, str(int(d)), str(int(k))) for s, d, k in ROWS]
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--rows")]
    if options.rows:
        passthrough = [a for a in passthrough if a not in options.rows]
    print(f"{options.label}: {options.batch}x{options.seq} tokens, hidden {options.hidden}, "
          f"intermediate {options.intermediate}, {options.layers} layers, vocab {options.vocab}")
    print("step | dropout | keep_dense | base GB | peak GB | peak - base GB | seconds", flush=True)
    for step_kind, dropout, keep_dense in rows:
        command = [sys.executable, "-m", "benchmarks.dropout_memory", *passthrough,
                   "--one", f"{step_kind},{dropout},{keep_dense}"]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode:
            print(f"{step_kind} | {dropout} | {keep_dense} | failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        p = options.dropout if dropout == "1" else 0.0
        dense = "-" if step_kind == "standard" else ("yes" if keep_dense == "1" else "no")
        print(f"{step_kind} | {p:g} | {dense} | {r['base_gb']:.3f} | {r['peak_gb']:.3f} | "
              f"{r['peak_gb'] - r['base_gb']:.3f} | {r['seconds']:.2f}", flush=True)


if __name__ == "__main__":
    main()
