"""Data-prep benchmark: format + tokenize Dolly-sized data, full prepare (cold and cached), padding per batching.

Records are synthetic with Dolly's length profile (15,011 records; instruction + context + response about 360
characters on average, a third with a context, log-normal tails to several thousand characters), built from an
invented vocabulary (or, with `--embedded-sample`, the records of the embedded Dolly sample). Tokenization uses
the real Mistral-7B-v0.1 tokenizer, or the one `--tokenizer` names (a .gguf file, tokenizer.json, tokenizer.model
or a model directory).

    python benchmarks/data_prep.py [--records 15011] [--scale 1.0] [--tokenizer PATH] [--embedded-sample]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import models  # noqa: F401  (fast BLAS before mlx)
import numpy as np

from harness.data import DataConfig, encode_records, load_tokenizer, padding_fraction, plan_batches, prepare_dataset

SYLLABLES = ["ka", "lo", "mer", "tis", "an", "vel", "or", "quin", "da", "res", "ul", "bo", "shen", "tra", "ing", "ed"]
COMMON = "the of and to a in is it that for was on are as with by this be at from or have an which".split()


def synthetic_records(n: int, seed: int = 0, scale: float = 1.0) -> list[dict[str, str]]:
    """`n` Dolly-shaped records; `scale` multiplies every length (1.0: Dolly's profile, mean ~360 chars)."""
    rng = np.random.default_rng(seed)
    invented = ["".join(rng.choice(SYLLABLES, rng.integers(1, 4))) for _ in range(3000)]
    vocabulary = np.array(COMMON * 40 + invented)

    def text(chars: float) -> str:
        words = vocabulary[rng.integers(0, len(vocabulary), max(1, int(chars / 5.5)))]
        sentence = " ".join(words)
        return sentence[0].upper() + sentence[1:] + "."

    def lognormal(mean: float, sigma: float) -> float:
        return min(12_000.0, rng.lognormal(np.log(mean) - sigma**2 / 2, sigma))

    categories = ["open_qa", "general_qa", "classification", "closed_qa", "brainstorming",
                  "information_extraction", "summarization", "creative_writing"]
    records = []
    for i in range(n):
        has_context = rng.random() < 0.3
        records.append({
            "instruction": text(scale * lognormal(70, 0.6)),
            "context": text(scale * lognormal(330, 0.9)) if has_context else "",
            "response": text(scale * lognormal(190, 1.0)),
            "category": categories[i % 8],
        })
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=15_011)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokenizer", default=None, help="tokenizer source; default: Mistral-7B-v0.1's")
    parser.add_argument("--embedded-sample", action="store_true", help="the embedded Dolly sample's records")
    args = parser.parse_args()

    start = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer)
    print(f"{tokenizer} loaded in {time.perf_counter() - start:.2f} s")
    if args.embedded_sample:
        from harness.data.records import embedded_sample_path, load_local_file

        records = load_local_file(embedded_sample_path()).records
    else:
        records = synthetic_records(args.records, scale=args.scale)
    chars = np.array([len(r["instruction"]) + len(r["context"]) + len(r["response"]) for r in records])
    print(f"{len(records)} records, chars per record: mean {chars.mean():.0f}, p50 {np.median(chars):.0f}, "
          f"p99 {np.percentile(chars, 99):.0f}, max {chars.max()}; {os.cpu_count()} CPU cores\n")

    rows = []
    for threads in (1, 0):
        start = time.perf_counter()
        result = encode_records(records, tokenizer, args.max_seq_len, num_threads=threads)
        seconds = time.perf_counter() - start
        tokens = sum(len(s.input_ids) for s in result.sequences if s is not None)
        label = f"format+tokenize ({threads or os.cpu_count()} thread{'s' if threads != 1 else ''})"
        rows.append((label, seconds, tokens))
    lengths = np.array([len(s.input_ids) for s in result.sequences if s is not None])
    print(f"truncated {dict(result.truncated)}, dropped {dict(result.dropped)}")

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "dolly.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in records))
        cfg = DataConfig(source=str(source), max_seq_len=args.max_seq_len, val_fraction=0.05)
        for label in ("prepare_dataset (cold cache)", "prepare_dataset (cached)"):
            start = time.perf_counter()
            prepared = prepare_dataset(cfg, tokenizer, cache_dir=tmp, progress=False)
            rows.append((label, time.perf_counter() - start, int(prepared.train.lengths.sum() + prepared.validation.lengths.sum())))

    print(f"\n{'stage':<34}{'records':>9}{'seconds':>9}{'records/s':>11}{'tokens/s':>11}")
    for label, seconds, tokens in rows:
        print(f"{label:<34}{len(records):>9}{seconds:>9.2f}{len(records) / seconds:>11.0f}{tokens / seconds:>11.0f}")

    print(f"\npadding fraction, batch {args.batch_size}, lengths rounded up to multiples of 32, max {args.max_seq_len}:")
    for label, kwargs in (("unsorted (random batches)", dict(sort_by_length=False)),
                          ("sorted within chunks of 64 batches", dict(sort_by_length=True)),
                          ("packed rows", dict(pack=True, pack_capacity=args.max_seq_len))):
        plan = plan_batches(lengths, args.batch_size, seed=0, **kwargs)
        fraction = padding_fraction(lengths, plan, args.batch_size, 32, args.max_seq_len)
        print(f"  {label:<36}{fraction:>7.3f}  ({len(plan)} batches)")


if __name__ == "__main__":
    main()
