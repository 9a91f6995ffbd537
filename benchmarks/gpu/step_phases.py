"""Where the host spends a whole-graph step (`harness.step.standard.TrainStep`): each phase timed on the host.

    python benchmarks/gpu/step_phases.py [--rows 8] [--seq 512] [--steps 6] [overrides ...]

Phases, as `TrainStep.__call__` and `harness.step.run.run_train_step` run them: replaying the compiled gradient
graph (`accumulate_gradients`: arrays created, no kernel yet), queuing it (`mx.async_eval`: MLX walks the graph and
encodes its kernels, at most a few command buffers ahead of the device), replaying the compiled update, then
evaluating the loss, tokens and norm (encoding the rest and waiting for the device). Then, for comparison, the
gradient replay alone again while the device is idle, and `mx.async_eval` of a graph already built. Median ms
over `--steps` steps after two untimed ones; prints one line per phase.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import models  # noqa: F401,E402  (fast BLAS before mlx)
import mlx.core as mx  # noqa: E402

from harness.bench import compose  # noqa: E402
from harness.bench_timing import synthetic_tokens  # noqa: E402
from harness.build import build_model, build_optimizer  # noqa: E402
from harness.step.accumulate import accumulate_gradients  # noqa: E402
from harness.step.standard import TrainStep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", default=["model=mistral-7b-shape"])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    options = parser.parse_args()
    cfg = compose(options.overrides)
    model = build_model(cfg, progress=False)
    model.train()
    optimizer = build_optimizer(cfg.optim, model, total_steps=1000)
    step = TrainStep(model, optimizer, grad_clip=cfg.optim.grad_clip, compile=cfg.trainer.compile)
    tokens = synthetic_tokens(options.rows, options.seq, model.args.vocab_size)
    batches = [{"input_ids": tokens, "labels": tokens, "attention_mask": mx.ones_like(tokens)}]
    phases: dict[str, list[float]] = {}

    def timed(name, fn):
        start = time.perf_counter()
        result = fn()
        phases.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
        return result

    for index in range(options.steps + 2):
        if index == 2:
            phases.clear()
        start = time.perf_counter()
        loss_sum, n_tokens, grads = timed("replay gradients", lambda: accumulate_gradients(step._gradients, batches))
        timed("queue gradients (async_eval)", lambda: mx.async_eval(loss_sum, n_tokens, grads))
        norm = timed("replay update", lambda: step._update(grads, n_tokens))
        timed("evaluate loss, tokens, norm (wait)", lambda: mx.eval(loss_sum, n_tokens, norm))
        phases.setdefault("whole step", []).append((time.perf_counter() - start) * 1e3)
    for _ in range(3):  # the replay with the device idle, then queuing a graph built beforehand
        mx.eval(model.parameters(), optimizer.state)
        loss_sum, n_tokens, grads = timed("replay gradients, device idle",
                                          lambda: accumulate_gradients(step._gradients, batches))
        timed("queue gradients, graph built before", lambda: mx.async_eval(loss_sum, n_tokens, grads))
        mx.eval(loss_sum, n_tokens, grads)
        norm = step._update(grads, n_tokens)
        mx.eval(norm)
    print(f"device {mx.default_device()}, {options.rows}x{options.seq}, {type(step).__name__}", flush=True)
    for name, values in phases.items():
        print(f"{name:<40} {statistics.median(values):8.1f} ms  ({', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
