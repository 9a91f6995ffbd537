"""What the GPU run scripts' reports share: the JSON lines a run wrote under $OUT, read back.

The scripts' report snippets import it from the repository root (`sys.path` gets `benchmarks/gpu`)."""

from __future__ import annotations

import json
from pathlib import Path


def rows(out: Path, name: str) -> list[dict]:
    """The JSON objects of `out/name`, one per non-empty line; none when the run wrote no such file."""
    path = Path(out) / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
