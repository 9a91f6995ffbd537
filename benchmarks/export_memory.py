"""Peak memory of exporting a LoRA'd quantized model as a merged Hugging Face directory, in a fresh process.

    python -m benchmarks.make_checkpoint --preset 7b
    python -m benchmarks.export_memory artifacts/checkpoints/mistral-7b-random --dtype bfloat16

No training: the checkpoint is quantized (first process, writing the quantized-base cache), then a second
process reloads the cache, puts LoRA adapters on it (rank 16 on all seven projections, non-zero B so the merge
does work) and calls `models.export.export_merged`. Reported: the quantized model's stored bytes, the largest
output shard, peak RSS (`ru_maxrss`) of the export process and the bound 1.3 x quantized + one shard, MLX's peak,
wall time. `--json` appends the row to a JSON-lines file.
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


def quantize(checkpoint: str, method: str, cache_dir: str) -> None:
    """First child: load + quantize the checkpoint into the cache."""
    import models  # noqa: F401  (fast BLAS before MLX)

    from models.checkpoint import load_pretrained
    from models.quant import QuantSpec

    load_pretrained(checkpoint, dtype="float32", quant=QuantSpec(method=method), cache_dir=cache_dir,
                    progress=False)


def export(
    checkpoint: str, method: str, cache_dir: str, out_dir: str, dtype: str, shard_gb: float, rank: int
) -> dict:
    """Second child: reload the quantized base, add adapters, export merged; what it cost."""
    import models  # noqa: F401

    import mlx.core as mx

    from harness.process import set_up_process
    from models.checkpoint import load_pretrained
    from models.export import export_merged
    from models.lora import LoRALinear, LoRASpec, apply_lora
    from models.quant import QuantSpec, model_bits_per_weight

    set_up_process()
    model = load_pretrained(checkpoint, dtype="float32", quant=QuantSpec(method=method), cache_dir=cache_dir,
                            progress=False)
    apply_lora(model, LoRASpec(rank=rank, alpha=2.0 * rank))
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_B = 0.01 * mx.random.normal(module.lora_B.shape)
    mx.eval(model.parameters())
    stored = model_bits_per_weight(model)["total_bytes"]
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    out = export_merged(model, out_dir, dtype=dtype, max_shard_bytes=int(shard_gb * 1024**3), progress=False)
    seconds = time.perf_counter() - start
    shards = sorted(out.glob("model*.safetensors"))
    return {
        "method": method,
        "dtype": dtype,
        "lora_rank": rank,
        "stored_bytes": stored,
        "shards": len(shards),
        "largest_shard_bytes": max(p.stat().st_size for p in shards),
        "output_bytes": sum(p.stat().st_size for p in shards),
        "rss_after_load_bytes": loaded_rss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "mlx_peak_bytes": mx.get_peak_memory(),
        "export_seconds": seconds,
    }


def child(args: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "benchmarks.export_memory", *args], cwd=REPO,
                          stdout=subprocess.PIPE, text=True, check=True)
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--quant", default="rowwise", choices=["rowwise", "group", "nf4"])
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the merged weights (or auto)")
    parser.add_argument("--shard-gb", type=float, default=5.0, help="output shard size in GiB (HF: 5)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--work-dir", help="quantized cache and output (default: a temporary folder, deleted)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=["quantize", "export"], help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)

    work = Path(opts.work_dir) if opts.work_dir else Path(tempfile.mkdtemp(prefix="export-memory-"))
    cache, out = str(work / "cache"), str(work / "merged")
    if opts.child == "quantize":
        quantize(opts.checkpoint, opts.quant, cache)
        return
    if opts.child == "export":
        row = export(opts.checkpoint, opts.quant, cache, out, opts.dtype, opts.shard_gb, opts.rank)
        print(json.dumps(row))
        return
    common = [opts.checkpoint, "--quant", opts.quant, "--dtype", opts.dtype, "--shard-gb", str(opts.shard_gb),
              "--rank", str(opts.rank), "--work-dir", str(work)]
    try:
        child([*common, "--child", "quantize"])
        row = json.loads(child([*common, "--child", "export"]))
    finally:
        if not opts.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    gb = 1e9
    bound = 1.3 * row["stored_bytes"] + row["largest_shard_bytes"]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"checkpoint: {opts.checkpoint}\nmachine: {machine}\ndate: {when}\n")
    print("| quant | dtype | quantized GB | shards (largest GB) | RSS after load GB | peak RSS GB | "
          "bound 1.3 x quantized + shard GB | MLX peak GB | export s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {row['method']} | {row['dtype']} | {row['stored_bytes'] / gb:.2f} | {row['shards']} "
          f"({row['largest_shard_bytes'] / gb:.2f}) | {row['rss_after_load_bytes'] / gb:.2f} | "
          f"{row['peak_rss_bytes'] / gb:.2f} | {bound / gb:.2f} | {row['mlx_peak_bytes'] / gb:.2f} | "
          f"{row['export_seconds']:.0f} |")
    print(f"\npeak RSS / bound = {row['peak_rss_bytes'] / bound:.2f}")
    if opts.json:
        with open(opts.json, "a") as f:
            record = {**row, "bound_bytes": bound, "checkpoint": opts.checkpoint, "machine": machine, "date": when}
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
