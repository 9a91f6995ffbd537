"""Peak memory and speed of one model's training step under MLX memory limits and cross-entropy chunk sizes.

    python -m benchmarks.gpu.memory_probe model=mistral-7b-shape --batch 4 --seq 512 --checkpointing \
        --limits 0 8 7 6 --chunks 0 512

Builds the model once (as `harness.bench` does, from the training configs), then for every (chunk, limit) pair
compiles a fresh training step (`make_train_step`, or `TrainStep` with `--single-graph`), runs 2 warm-up and `--steps` timed steps and prints tokens/s and
`mx.get_peak_memory()`. Limit 0 = MLX's default; chunk 0 = `models.cross_entropy.default_chunk_size`.
On a GPU most of an unlimited peak is memory still held by queued work; the limit makes MLX wait for that work,
so the limited peaks show how large the live set really is and what bounding it costs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import models  # noqa: F401, I001  (loads the fast BLAS before MLX)
import mlx.core as mx

from harness.bench import compose, synthetic_tokens
from harness.build import build_model, build_optimizer
from harness.step.layerwise import IN_FLIGHT, LayerwiseTrainStep
from harness.step.factory import make_train_step
from harness.step.standard import TrainStep
from models import cross_entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--limits", type=float, nargs="+", default=[0.0], help="GB; 0 = MLX's default")
    parser.add_argument("--single-graph", action="store_true", help="TrainStep with mx.checkpoint, not layerwise")
    parser.add_argument("--in-flight", type=int, default=0, help="LayerwiseTrainStep: layers queued at once")
    parser.add_argument("--rebuild-dense", action="store_true", help="LayerwiseTrainStep: no dequantize_saved")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0], help="CE rows per chunk; 0 = default")
    options = parser.parse_intermixed_args()
    overrides = options.overrides + (["trainer.gradient_checkpointing=true"] if options.checkpointing else [])
    cfg = compose(overrides)
    model = build_model(cfg, progress=False)
    mx.eval(model.parameters())
    print(f"model: {mx.get_active_memory() / 1e9:.2f} GB active after build", flush=True)
    tokens = synthetic_tokens(options.batch, options.seq, model.args.vocab_size)
    data = {"input_ids": tokens, "labels": tokens, "attention_mask": mx.ones_like(tokens)}
    default_limit = mx.set_memory_limit(0)
    mx.set_memory_limit(default_limit)
    default_chunk = cross_entropy.default_chunk_size
    print("chunk | limit GB | tok/s | peak GB", flush=True)
    for chunk in options.chunks:
        cross_entropy.default_chunk_size = default_chunk if chunk == 0 else (lambda *_, c=chunk: c)
        cross_entropy._FUSED_CACHE.clear()
        for limit in options.limits:
            mx.set_memory_limit(int(limit * 1e9) if limit else default_limit)
            optimizer = build_optimizer(cfg.optim, model, total_steps=100)
            if options.single_graph:
                step = TrainStep(model, optimizer, grad_clip=cfg.optim.grad_clip, compile=cfg.trainer.compile)
            elif options.in_flight or options.rebuild_dense:
                step = LayerwiseTrainStep(model, optimizer, grad_clip=cfg.optim.grad_clip,
                                          in_flight=options.in_flight or IN_FLIGHT,
                                          keep_dense=not options.rebuild_dense)
            else:
                step = make_train_step(model, optimizer, grad_clip=cfg.optim.grad_clip, compile=cfg.trainer.compile)
            model.train()

            def run():
                mx.eval(step([data]), model.trainable_parameters(), optimizer.state)

            run()
            run()
            mx.clear_cache()
            mx.reset_peak_memory()
            times = []
            for _ in range(options.steps):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            tok_s = options.batch * options.seq / statistics.median(times)
            used = chunk or default_chunk(model.args.hidden_size, model.args.vocab_size)
            print(f"{used} | {limit or 'default'} | {tok_s:,.0f} | {mx.get_peak_memory() / 1e9:.2f}", flush=True)
            mx.clear_cache()
    mx.set_memory_limit(default_limit)


if __name__ == "__main__":
    main()
