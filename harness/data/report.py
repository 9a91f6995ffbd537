"""The printed summary of a prepared dataset: counts per split and category, drops, token lengths."""

from __future__ import annotations

import sys
from typing import TextIO

from harness.data.dataset import SPLITS, PreparedData


def format_report(prepared: PreparedData) -> str:
    """The report as text (one screen)."""
    stats = prepared.stats
    splits = stats["splits"]
    lines = [
        f"source: {stats['source']}  ({stats['records']} valid records)",
        f"cache:  {prepared.cache_path}  ({'reused' if prepared.cache_hit else 'written'})",
        "",
    ]
    categories = sorted({c for name in SPLITS for c in splits[name]["categories"]})
    width = max([len("category"), *map(len, categories)]) + 2
    lines.append("category".ljust(width) + "".join(f"{name:>12}" for name in SPLITS))
    for category in categories:
        counts = "".join(f"{splits[name]['categories'].get(category, 0):>12}" for name in SPLITS)
        lines.append(category.ljust(width) + counts)
    lines.append("total examples".ljust(width) + "".join(f"{splits[name]['examples']:>12}" for name in SPLITS))
    lines.append("")
    lines.append("tokens".ljust(width) + "".join(f"{splits[name]['tokens']:>12}" for name in SPLITS))
    lines.append("label tokens".ljust(width) + "".join(f"{splits[name]['label_tokens']:>12}" for name in SPLITS))
    for key in ("p50", "p90", "p99", "max", "mean"):
        values = "".join(f"{splits[name]['length'].get(key, 0):>12g}" for name in SPLITS)
        lines.append(f"length {key}".ljust(width) + values)
    lines.append("max_seq_len".ljust(width) + "".join(f"{splits[name]['max_seq_len']:>12}" for name in SPLITS))
    lines.append("")
    for name in SPLITS:
        split = splits[name]
        dropped = ", ".join(f"{n} {reason}" for reason, n in split["dropped"].items()) or "none"
        truncated = ", ".join(f"{n} {what}" for what, n in split["truncated"].items()) or "none"
        lines.append(f"{name}: dropped {dropped}; truncated {truncated}")
    if stats["invalid_records"]:
        lines.append(skipped_records_line(stats))
        lines.extend(f"  {example}" for example in stats["invalid_examples"])
    return "\n".join(lines)


def skipped_records_line(stats: dict) -> str | None:
    """`invalid records skipped: N (reasons)` under `data.invalid_records=skip`, or None when none were."""
    counts = stats.get("invalid_records") or {}
    if not counts:
        return None
    reasons = ", ".join(f"{n} {reason}" for reason, n in counts.items())
    return f"invalid records skipped: {sum(counts.values())} ({reasons}) from {stats.get('source')}"


def print_report(prepared: PreparedData, file: TextIO | None = None) -> None:
    """Print `format_report(prepared)` (to stdout by default)."""
    print(format_report(prepared), file=file or sys.stdout)
