"""The GPU's own account of a training step: every kernel's duration, from CUDA's profiling interface (CUPTI),
read through PyTorch's profiler in the same process as MLX (CUDA only; PyTorch with CUDA must be importable).

    python benchmarks/gpu/kernel_trace.py [--rows 8] [--seq 512] [--steps 2] [--compare NAME --variant V]
        [--eval-set all|loop] [overrides ...]

(default: 7B shape, the trainer's step as `trainer.train_step` chooses it for the micro-batch; `--compare` and
`--variant` apply one variant of `benchmarks/ab_step.py`'s comparisons before the step is built).

Host-side timers cannot tell a small kernel's device time from the host's cost of issuing it (a step whose host
runs ahead of the GPU hides the latter; one bound by the host shows it). The trace can: it gives the wall time
of the traced steps, the time the GPU was busy (the union of kernel intervals, so idle gaps show a host-bound
step), the idle gaps grouped by the kernel that ran before each (where the GPU waited for the host), and the
kernels grouped by name, with their count and total time per step. Matrix products are split by
duration at `--short-us` (the adapters' thin products are short, the frozen weights' long). Prints the table and
writes $OUT/kernel_trace<tag>.json when OUT is set.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import models  # noqa: F401,E402  (fast BLAS before mlx)
import mlx.core as mx  # noqa: E402

from benchmarks.ab_step import COMPARISONS, STEP_KIND, add_eval_set_option, evaluate_step  # noqa: E402
from harness.bench import compose  # noqa: E402
from harness.bench_timing import synthetic_tokens  # noqa: E402
from harness.build import build_model, build_optimizer  # noqa: E402
from harness.step.factory import configured_train_step  # noqa: E402

MATMUL = re.compile(r"gemm|nvjet|cutlass|xmma|sm90_|sm80_|cublas", re.IGNORECASE)


def kernel_events(trace_file: str) -> list[dict]:
    """The kernel events (name, start and duration in microseconds) of a Chrome trace written by PyTorch's
    profiler."""
    events = json.loads(Path(trace_file).read_text())["traceEvents"]
    return [e for e in events if e.get("cat") == "kernel" and "dur" in e]


def busy_us(events: list[dict]) -> float:
    """Microseconds during which at least one kernel ran (the union of their intervals)."""
    busy, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if start > end:
            busy += stop - start
        elif stop > end:
            busy += stop - end
        end = max(end, stop)
    return busy


def idle_after(events: list[dict]) -> dict[str, list[float]]:
    """The GPU's idle gaps (no kernel running), by the name of the kernel that ended each: [count, microseconds]."""
    gaps = collections.defaultdict(lambda: [0, 0.0])
    end, last = None, None
    for event in sorted(events, key=lambda e: e["ts"]):
        if end is not None and event["ts"] > end:
            gaps[last][0] += 1
            gaps[last][1] += event["ts"] - end
        if end is None or event["ts"] + event["dur"] >= end:
            end, last = event["ts"] + event["dur"], event["name"]
    return gaps


def category(name: str, duration_us: float, short_us: float) -> str:
    if MATMUL.search(name):
        return "matmul, short" if duration_us < short_us else "matmul, long"
    lowered = name.lower()
    for key, label in (("dequant", "dequantize (ours)"), ("sdpa", "attention"), ("attention", "attention"),
                       ("flash", "attention"), ("cudnn", "attention"), ("copy", "copy"), ("reduce", "reduce"),
                       ("compiled", "fused elementwise"), ("binary", "elementwise"), ("unary", "elementwise")):
        if key in lowered:
            return label
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", default=["model=mistral-7b-shape"])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--short-us", type=float, default=60.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--tag", default="")
    parser.add_argument("--compare", choices=sorted(COMPARISONS))
    parser.add_argument("--variant", help="one of the comparison's variants (default: its first)")
    add_eval_set_option(parser)
    options = parser.parse_args()
    import torch  # only here: the profiler (CUPTI), not PyTorch's arithmetic

    cfg = compose(options.overrides)
    model = build_model(cfg, progress=False)
    model.train()
    if options.compare:
        variants = COMPARISONS[options.compare]
        variants[options.variant or next(iter(variants))](model)
        cfg.trainer.train_step = STEP_KIND.get("kind", cfg.trainer.train_step)
    optimizer = build_optimizer(cfg.optim, model, total_steps=1000)
    step = configured_train_step(model, optimizer, cfg, micro_batch_tokens=options.rows * options.seq)
    tokens = synthetic_tokens(options.rows, options.seq, model.args.vocab_size)
    batch = {"input_ids": tokens, "labels": tokens, "attention_mask": mx.ones_like(tokens)}

    def run():
        evaluate_step(step, [batch], model, optimizer, options.eval_set)

    for _ in range(options.warmup):
        run()
    torch.cuda.init()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        for _ in range(options.steps):
            run()
        wall_us = (time.perf_counter() - start) * 1e6 / options.steps
    with tempfile.TemporaryDirectory() as scratch:
        trace = os.path.join(scratch, "trace.json")
        profiler.export_chrome_trace(trace)
        events = kernel_events(trace)
    steps = options.steps
    by_name = collections.defaultdict(lambda: [0, 0.0])
    by_category = collections.defaultdict(lambda: [0, 0.0])
    for event in events:
        for table, key in ((by_name, event["name"]), (by_category, category(event["name"], event["dur"],
                                                                             options.short_us))):
            table[key][0] += 1
            table[key][1] += event["dur"]
    def per_step(table):  # {key: (count, ms)} a step, the largest time first
        return {k: (c / steps, t / steps / 1e3) for k, (c, t) in sorted(table.items(), key=lambda kv: -kv[1][1])}

    categories, gaps, kernels = per_step(by_category), per_step(idle_after(events)), per_step(by_name)
    busy_ms, kernel_ms = busy_us(events) / steps / 1e3, sum(e["dur"] for e in events) / steps / 1e3
    print(f"device {mx.default_device()}, {options.overrides}, {options.rows}x{options.seq}, {type(step).__name__}")
    print(f"per step: wall {wall_us / 1e3:.1f} ms, GPU busy {busy_ms:.1f} ms, kernel time {kernel_ms:.1f} ms, "
          f"kernels {len(events) / steps:.0f}")
    print("\nby category (per step): count, ms")
    for key, (count, ms) in categories.items():
        print(f"  {key:<24} {count:7.0f} {ms:9.2f}")
    print("\nGPU idle after a kernel (per step; the gaps between steps included): count, ms")
    for key, (count, ms) in list(gaps.items())[:10]:
        print(f"  {count:6.0f} {ms:8.2f}  {key[:110]}")
    print(f"\ntop {options.top} kernels (per step): count, ms, mean us")
    for key, (count, ms) in list(kernels.items())[:options.top]:
        print(f"  {count:6.0f} {ms:8.2f} {ms / count * 1e3:8.1f}  {key[:110]}")
    out = os.environ.get("OUT")
    if out:
        Path(out, f"kernel_trace{options.tag}.json").write_text(json.dumps(
            {"device": str(mx.default_device()), "overrides": options.overrides, "rows": options.rows,
             "seq": options.seq, "compare": options.compare, "variant": options.variant,
             "eval_set": options.eval_set,
             "step": type(step).__name__, "wall_ms": wall_us / 1e3, "busy_ms": busy_ms,
             "kernel_ms": kernel_ms, "categories": categories, "idle_after": gaps, "kernels": kernels}, indent=1))

if __name__ == "__main__":
    main()
