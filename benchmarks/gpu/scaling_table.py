"""Scaling table from `harness.bench` results (one JSON object per line, `ranks` per result): tokens/s per
number of ranks and the scaling efficiency against one rank, e.g. two GPUs' tokens/s / (2 x one GPU's).

    python benchmarks/gpu/scaling_table.py OUT/distributed.jsonl
"""

from __future__ import annotations

import json
import sys


def scaling_rows(results: list[dict]) -> list[list[str]]:
    """One row per result: ranks, rows per rank, seq, step seconds, tokens/s, speed-up and efficiency against
    the single-rank result of the same shape (the last one when several)."""
    single = {(r["shape"], r["batch"], r["seq"]): r for r in results if r.get("ranks", 1) == 1}
    rows = []
    for r in results:
        ranks = r.get("ranks", 1)
        base = single.get((r["shape"], r["batch"], r["seq"]))
        speedup = r["tokens_per_second"] / base["tokens_per_second"] if base else float("nan")
        rows.append([r["shape"], str(ranks), str(r["batch"]), str(r["seq"]), f"{r['step_seconds']:.3f}",
                     f"{r['tokens_per_second']:,.0f}", f"{speedup:.2f}x", f"{speedup / ranks:.1%}",
                     f"{r['peak_memory_gb']:.1f}", r["device"]])
    return rows


def main(path: str) -> None:
    with open(path) as f:
        results = [json.loads(line) for line in f if line.strip()]
    if not results:
        sys.exit(f"{path}: no results (see the log next to it)")
    headers = ["shape", "ranks", "rows/rank", "seq", "s/step", "tok/s (all ranks)", "speed-up", "efficiency",
               "peak GB/rank", "device"]
    rows = scaling_rows(results)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
    main(sys.argv[1])
