"""Peak memory and time to load a checkpoint and quantize it, each measurement in a fresh process.

    python -m benchmarks.make_checkpoint --preset 7b
    python -m benchmarks.load_memory artifacts/checkpoints/mistral-7b-random --quant rowwise group nf4

For each quant method, two fresh processes: one loads the checkpoint and quantizes it layer by layer
(writing the quantized-base cache), one reloads that cache. Each reports the quantized model's stored
bytes and bits per weight, peak RSS (`ru_maxrss`), MLX's peak allocated memory (`mx.get_peak_memory`),
both as a ratio to the stored size, and wall time. `--json` appends the rows to a JSON-lines file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(checkpoint: str, method: str, dtype: str, cache_dir: str) -> dict:
    """Run in the child process: one `load_pretrained` call and what it cost."""
    import models  # noqa: F401  (fast BLAS before MLX)

    import mlx.core as mx

    from models.loading import load_pretrained
    from models.quant import QuantSpec, model_bits_per_weight

    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    spec = None if method == "none" else QuantSpec(method=method)
    start = time.perf_counter()
    model = load_pretrained(checkpoint, dtype=dtype, quant=spec, cache_dir=cache_dir if spec else None)
    mx.eval(model.parameters())
    seconds = time.perf_counter() - start
    sizes = model_bits_per_weight(model)
    return {
        "method": method,
        "dtype": dtype,
        "seconds": seconds,
        "stored_bytes": sizes["total_bytes"],
        "quantized_bits_per_weight": sizes["quantized_bits_per_weight"],
        "model_bits_per_weight": sizes["model_bits_per_weight"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "baseline_rss_bytes": baseline_rss,
        "mlx_peak_bytes": mx.get_peak_memory(),
    }


def run_child(checkpoint: str, method: str, dtype: str, cache_dir: str) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.load_memory",
        "--child",
        checkpoint,
        "--quant",
        method,
        "--dtype",
        dtype,
        "--cache-dir",
        cache_dir,
    ]
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    gb = 1e9
    lines = [
        (
            "| method | step | stored GB | bits/weight (quantized layers / whole model) | peak RSS GB (x stored) "
            "| MLX peak GB (x stored) | RSS before load GB | wall s |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        stored = r["stored_bytes"]
        lines.append(
            f"| {r['method']} | {r['step']} | {stored / gb:.2f} | {r['quantized_bits_per_weight']:.3f} / "
            f"{r['model_bits_per_weight']:.2f} | {r['peak_rss_bytes'] / gb:.2f} ({r['peak_rss_bytes'] / stored:.2f}x) "
            f"| {r['mlx_peak_bytes'] / gb:.2f} ({r['mlx_peak_bytes'] / stored:.2f}x) "
            f"| {r['baseline_rss_bytes'] / gb:.2f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint directory, Hub repo id, or .gguf file")
    parser.add_argument(
        "--quant", nargs="+", default=["rowwise"], choices=["rowwise", "group", "nf4", "none"]
    )
    parser.add_argument("--dtype", default="auto", help="compute dtype: auto, float32, bfloat16, float16")
    parser.add_argument(
        "--cache-dir", help="quantized-base cache (default: a temporary directory, deleted after)"
    )
    parser.add_argument("--json", type=Path, help="append one JSON line per measurement here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)

    if opts.child:
        print(json.dumps(measure(opts.checkpoint, opts.quant[0], opts.dtype, opts.cache_dir)))
        return

    cache_root = Path(opts.cache_dir) if opts.cache_dir else Path(tempfile.mkdtemp(prefix="quant-cache-"))
    rows = []
    try:
        for method in opts.quant:
            cache = cache_root / method
            shutil.rmtree(cache, ignore_errors=True)  # the first step must really quantize
            steps = ["load + quantize + write cache"] + (["reload from cache"] if method != "none" else [])
            for step in steps:
                row = run_child(opts.checkpoint, method, opts.dtype, str(cache))
                rows.append({"step": step, **row})
                print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    finally:
        if not opts.cache_dir:
            shutil.rmtree(cache_root, ignore_errors=True)

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"checkpoint: {opts.checkpoint}\nmachine: {machine}\ndate: {when}\n")
    print(table(rows))
    if opts.json:
        with open(opts.json, "a") as f:
            for row in rows:
                f.write(
                    json.dumps({**row, "checkpoint": opts.checkpoint, "machine": machine, "date": when})
                    + "\n"
                )


if __name__ == "__main__":
    main()
