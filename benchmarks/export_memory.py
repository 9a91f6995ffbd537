"""Peak memory of exporting a LoRA'd quantized model as a merged Hugging Face directory.

    python -m benchmarks.export_memory random:7b --dtype bfloat16          # a random 7B shape, built in-process
    python -m benchmarks.make_checkpoint --preset 7b
    python -m benchmarks.export_memory artifacts/checkpoints/mistral-7b-random --dtype bfloat16

No training. The quantized base comes from a checkpoint (quantized by a first process into the quantized-base cache,
reloaded by a second) or, for `random:<preset>` (`benchmarks.make_checkpoint`'s presets), is built with random
weights and quantized layer by layer in the measuring process, as `harness.build` builds `model=mistral-7b-shape`.
LoRA adapters go on it (rank 16 on all seven projections, non-zero B so the merge does work), then
`models.export.export_merged` writes the merged directory. The export's own peak RSS is measured from the
resident size after the base is in memory: Linux's high-water mark (`VmHWM`) is reset there (`/proc/self/clear_refs`)
and read after the export. Reported beside it: the quantized model's stored bytes, the largest output shard, the
bound 1.3 x quantized + one shard, the process's lifetime peak (`ru_maxrss`), MLX's peak, wall time.
`--json` appends the row to a JSON-lines file.
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


def status_bytes(field: str) -> int:
    """A `/proc/self/status` memory field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Start Linux's resident high-water mark (VmHWM) again from the current resident size."""
    Path("/proc/self/clear_refs").write_text("5")


def quantized_base(source: str, method: str, cache_dir: str):
    """The quantized model: `random:<preset>` built here, else the checkpoint through the quantized cache."""
    import mlx.core as mx

    from models.quant import QuantSpec

    if source.startswith("random:"):
        from benchmarks.make_checkpoint import PRESETS
        from models.mistral import MistralForCausalLM, ModelArgs
        from models.quant import quantize_model

        mx.random.seed(0)
        model = MistralForCausalLM(ModelArgs(**PRESETS[source.split(":", 1)[1]]))
        quantize_model(model, QuantSpec(method=method), progress=False)  # the random weights are lazy until here
        mx.eval(model.parameters())
        return model
    from models.loading import load_pretrained

    return load_pretrained(source, dtype="float32", quant=QuantSpec(method=method), cache_dir=cache_dir,
                           progress=False)


def export(source: str, method: str, cache_dir: str, out_dir: str, dtype: str, shard_gb: float, rank: int) -> dict:
    """Measuring child: the quantized base, adapters on it, the merged export; what the export cost."""
    import models  # noqa: F401  (fast BLAS before MLX)

    import mlx.core as mx

    from harness.process import set_up_process
    from models.export import export_merged
    from models.lora import LoRALinear, LoRASpec, apply_lora
    from models.memory import release_cache
    from models.quant import model_bits_per_weight

    set_up_process()
    model = quantized_base(source, method, cache_dir)
    apply_lora(model, LoRASpec(rank=rank, alpha=2.0 * rank))
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_B = 0.01 * mx.random.normal(module.lora_B.shape)
    mx.eval(model.parameters())
    release_cache()
    stored = model_bits_per_weight(model)["total_bytes"]
    rss_before = status_bytes("VmRSS")
    reset_peak_rss()
    mx.reset_peak_memory()
    start = time.perf_counter()
    out = export_merged(model, out_dir, dtype=dtype, max_shard_bytes=int(shard_gb * 1024**3), progress=False)
    seconds = time.perf_counter() - start
    shards = sorted(out.glob("model*.safetensors"))
    return {
        "source": source,
        "method": method,
        "dtype": dtype,
        "lora_rank": rank,
        "stored_bytes": stored,
        "shards": len(shards),
        "largest_shard_bytes": max(p.stat().st_size for p in shards),
        "output_bytes": sum(p.stat().st_size for p in shards),
        "rss_before_export_bytes": rss_before,
        "export_peak_rss_bytes": status_bytes("VmHWM"),
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "export_mlx_peak_bytes": mx.get_peak_memory(),
        "export_seconds": seconds,
    }


def child(args: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "benchmarks.export_memory", *args], cwd=REPO,
                          stdout=subprocess.PIPE, text=True, check=True)
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="checkpoint directory, or random:<preset> (e.g. random:7b)")
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
        import models  # noqa: F401

        quantized_base(opts.source, opts.quant, cache)
        return
    if opts.child == "export":
        row = export(opts.source, opts.quant, cache, out, opts.dtype, opts.shard_gb, opts.rank)
        print(json.dumps(row))
        return
    common = [opts.source, "--quant", opts.quant, "--dtype", opts.dtype, "--shard-gb", str(opts.shard_gb),
              "--rank", str(opts.rank), "--work-dir", str(work)]
    try:
        if not opts.source.startswith("random:"):
            child([*common, "--child", "quantize"])
        row = json.loads(child([*common, "--child", "export"]))
    finally:
        if not opts.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    gb = 1e9
    bound = 1.3 * row["stored_bytes"] + row["largest_shard_bytes"]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"source: {opts.source}\nmachine: {machine}\ndate: {when}\n")
    print("| quant | dtype | quantized GB | shards (largest GB) | RSS before export GB | export peak RSS GB | "
          "bound 1.3 x quantized + shard GB | process peak RSS GB | export MLX peak GB | export s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {row['method']} | {row['dtype']} | {row['stored_bytes'] / gb:.2f} | {row['shards']} "
          f"({row['largest_shard_bytes'] / gb:.2f}) | {row['rss_before_export_bytes'] / gb:.2f} | "
          f"{row['export_peak_rss_bytes'] / gb:.2f} | {bound / gb:.2f} | {row['process_peak_rss_bytes'] / gb:.2f} | "
          f"{row['export_mlx_peak_bytes'] / gb:.2f} | {row['export_seconds']:.0f} |")
    print(f"\nexport peak RSS / bound = {row['export_peak_rss_bytes'] / bound:.2f}")
    if opts.json:
        with open(opts.json, "a") as f:
            record = {**row, "bound_bytes": bound, "machine": machine, "date": when}
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
