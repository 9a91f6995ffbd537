"""Batches of real lengths for `harness.bench --dolly-lengths`: Dolly-profile records, tokenized as training
tokenizes them, batched as training batches them (length-sorted, padded to `data.pad_to_multiple`).

Records come from the synthetic generator with Dolly's length profile (`benchmarks/data_prep.py`), so the
benchmark needs no download; the model's own tokenizer turns them into token ids (Mistral-7B-v0.1's for
random-weight shapes, as in training). Only lengths matter to a step's time on random weights, so ids beyond
a small test vocabulary are folded into it.
"""

from __future__ import annotations

import numpy as np

from harness.data import encode_records, load_tokenizer, plan_batches
from harness.data.batching import collate


def dolly_profile_examples(cfg, count: int, vocab_size: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """`count` training examples (`input_ids`, `labels`, `attention_mask` lists) of Dolly-profile records,
    encoded with `cfg`'s tokenizer and template at `cfg.data.max_seq_len` tokens at most."""
    from benchmarks.data_prep import synthetic_records
    from harness.build import tokenizer_path
    from harness.data.dataset import template_of

    tokenizer = load_tokenizer(tokenizer_path(cfg))
    examples: list[dict[str, list[int]]] = []
    offset = 0
    while len(examples) < count:  # a record the template cannot fit is dropped: draw more
        records = synthetic_records(count, seed=seed + offset)
        offset += 1
        encoded = encode_records(records, tokenizer, cfg.data.max_seq_len, template_of(cfg.data), num_threads=1)
        examples += [s.as_example() for s in encoded.sequences if s is not None]
    examples = examples[:count]
    for example in examples:
        for key in ("input_ids", "labels"):
            example[key] = [t % vocab_size if t >= vocab_size else t for t in example[key]]
    return examples


def length_sorted_batches(examples: list[dict], batch_size: int, data_cfg, seed: int = 0) -> list[dict]:
    """Every example once, in batches of `batch_size` rows planned and padded as training does
    (`harness.data.plan_batches` sorted by length, `collate` to `data_cfg.pad_to_multiple`); numpy arrays
    `input_ids`, `labels`, `attention_mask` `(batch_size, width)` per batch; trailing rows short of a batch
    are dropped."""
    lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
    plan = plan_batches(lengths, batch_size, seed=seed, sort_by_length=True)
    return [collate(examples, rows, batch_size, data_cfg.pad_to_multiple, data_cfg.max_seq_len, False, 0)
            for rows in plan if len(rows) == batch_size]


__all__ = ["dolly_profile_examples", "length_sorted_batches"]
