"""Fixtures of the data-pipeline tests: the real Mistral tokenizer and small Dolly-shaped files under tmp_path."""

import json
from pathlib import Path

import pytest

from harness.data import DataConfig, load_tokenizer
from tests.conftest import smollm2_gguf_path

SMOLLM2_GGUF = smollm2_gguf_path()  # at import: fixtures may point QLORA_CACHE_DIR at tmp_path later


@pytest.fixture(scope="session")
def tokenizer():
    """Mistral-7B-v0.1's tokenizer (the copy inside mistral_common)."""
    return load_tokenizer()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's byte-level BPE from its GGUF (no BOS added, pads with EOS)."""
    if SMOLLM2_GGUF is None:
        pytest.skip("SmolLM2-135M-Instruct GGUF not in the model cache (python -m harness.download)")
    return load_tokenizer(SMOLLM2_GGUF)


def dolly_records(n: int, *, categories=("open_qa", "closed_qa", "summarization")) -> list[dict]:
    """`n` distinct small records, every third one with a context."""
    return [
        {
            "instruction": f"Question number {i}: what is {i} plus {i}?",
            "context": f"Some context about the number {i}." if i % 3 == 0 else "",
            "response": f"{i} plus {i} is {2 * i}.",
            "category": categories[i % len(categories)],
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows) -> Path:
    """Write rows (dicts are JSON-encoded, strings written as they are) one per line."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def small_source(tmp_path) -> Path:
    """A 60-record Dolly-format .jsonl file."""
    return write_jsonl(tmp_path / "dolly.jsonl", dolly_records(60))


@pytest.fixture
def small_config(small_source, tmp_path) -> DataConfig:
    return DataConfig(source=str(small_source), max_seq_len=64, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
