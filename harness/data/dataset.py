"""`prepare_dataset`: source -> records -> split -> encoded examples, cached on disk for every later run."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from harness.console import note
from harness.data.cache import cache_key, default_cache_dir, discard_entry, entry_dir, is_complete, write_entry
from harness.data.config import DataConfig, TemplateConfig
from harness.data.encode import encode_records
from harness.data.errors import DataError
from harness.data.examples import EncodedSplit
from harness.data.records import INVALID_POLICIES, load_records, reason_kind
from harness.data.split import split_indices
from models.json_files import read_json_object
from models.tokenizer import Tokenizer, load_tokenizer

SPLITS = ("train", "validation")
PERCENTILES = (50, 90, 99)


@dataclass
class PreparedData:
    """The tokenized splits and what happened on the way.

    `train` / `validation`: `EncodedSplit`s (sequences of example dicts with `input_ids`, `attention_mask`,
    `labels`, `record`). `stats`: counts per split and category, drops with reasons, token-length percentiles
    (see `print_report`). `cache_path`: the cache entry; `cache_hit`: whether it was reused.
    """

    train: EncodedSplit
    validation: EncodedSplit
    stats: dict
    cache_path: Path
    cache_hit: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage of this call


def template_of(cfg) -> TemplateConfig:
    """The config's template as a `TemplateConfig` (accepts a dataclass or an OmegaConf node)."""
    source = cfg.template
    return TemplateConfig(**{f.name: str(getattr(source, f.name)) for f in fields(TemplateConfig)})


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    """Token-length summary of a split: p50/p90/p99/max/mean (tokens)."""
    if len(lengths) == 0:
        return {}
    summary = {f"p{p}": float(np.percentile(lengths, p)) for p in PERCENTILES}
    summary.update(max=int(lengths.max()), mean=round(float(lengths.mean()), 1))
    return summary


def _check_config(cfg) -> None:
    if cfg.invalid_records not in INVALID_POLICIES:
        raise DataError(f"data.invalid_records must be one of {INVALID_POLICIES}, got {cfg.invalid_records!r}")
    for key in ("max_seq_len", "val_max_seq_len"):
        value = getattr(cfg, key)
        if value is not None and value < 2:
            raise DataError(f"data.{key} must be at least 2 (BOS + one response token), got {value}")


def read_stats(entry: Path) -> dict:
    """The `stats.json` of a cache entry; a damaged one is a `DataError` naming it."""
    path = entry / "stats.json"
    stats = read_json_object(path, DataError, "the statistics of a cache entry")
    if not isinstance(stats.get("splits"), dict):
        raise DataError(f"{path}: not the statistics of a cache entry")
    return stats


def prepare_dataset(
    cfg: DataConfig,
    tokenizer: Tokenizer | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> PreparedData:
    """Load, validate, split and tokenize the records of `cfg.source`, or reuse the cached result.

    `cfg`: a `DataConfig` (or the `data` node of a composed Hydra config). `tokenizer`: None loads
    `cfg.tokenizer_path`. `cache_dir`: None uses `cfg.cache_dir`, then `$QLORA_CACHE_DIR`, then
    `~/.cache/mistral-dolly-qlora`. The cache key covers the source fingerprint, the tokenizer's identity, template,
    `max_seq_len`, `val_max_seq_len`, split settings and `max_records`: changing any of them re-tokenizes.
    Raises `DataError` on bad records (see `harness.data.records`) and when no training example is left.
    """
    _check_config(cfg)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer_path)
    loaded = load_records(
        cfg.source, revision=cfg.revision, hub_split=cfg.hub_split, invalid_records=cfg.invalid_records
    )
    records = loaded.records if cfg.max_records is None else loaded.records[: cfg.max_records]
    timings["load"] = time.perf_counter() - start

    template = template_of(cfg)
    val_max_seq_len = cfg.val_max_seq_len or cfg.max_seq_len
    key_parts = {
        "source": loaded.fingerprint,
        "invalid_records": cfg.invalid_records,
        "max_records": cfg.max_records,
        "tokenizer": tokenizer.identity,
        "template": {f.name: getattr(template, f.name) for f in fields(TemplateConfig)},
        "max_seq_len": cfg.max_seq_len,
        "val_max_seq_len": val_max_seq_len,
        "val_fraction": cfg.val_fraction,
        "stratify": cfg.stratify,
        "split_seed": cfg.split_seed,
    }
    root = cache_dir or cfg.cache_dir or default_cache_dir()
    path = entry_dir(root, cache_key(key_parts))
    if is_complete(path):
        start = time.perf_counter()
        try:
            prepared = PreparedData(
                train=EncodedSplit.load(path, "train"),
                validation=EncodedSplit.load(path, "validation"),
                stats=read_stats(path),
                cache_path=path,
                cache_hit=True,
                timings=timings,
            )
            timings["cache_read"] = time.perf_counter() - start
            return prepared
        except DataError as err:  # a damaged entry: say so, drop it, and tokenize again below
            note(f"warning: damaged cache entry, tokenizing again: {err}")
            discard_entry(path)

    start = time.perf_counter()
    train_idx, val_idx = split_indices(records, cfg.val_fraction, seed=cfg.split_seed, stratify=cfg.stratify)
    splits: dict[str, EncodedSplit] = {}
    stats: dict = {
        "source": loaded.description,
        "key": key_parts,
        "records": len(records),
        "invalid_records": dict(Counter(reason_kind(reason) for _, reason in loaded.invalid)),
        "invalid_examples": [f"{where}: {reason}" for where, reason in loaded.invalid[:10]],
        "splits": {},
    }
    for name, indices, max_len in (("train", train_idx, cfg.max_seq_len), ("validation", val_idx, val_max_seq_len)):
        split_records = [records[i] for i in indices]
        result = encode_records(
            split_records, tokenizer, max_len, template,
            num_threads=cfg.tokenize_threads, progress=progress, desc=f"tokenizing {name}",
        )
        kept = [i for i, s in enumerate(result.sequences) if s is not None]
        split = EncodedSplit.from_sequences([result.sequences[i] for i in kept], [split_records[i] for i in kept])
        splits[name] = split
        stats["splits"][name] = {
            "records": len(split_records),
            "examples": len(split),
            "max_seq_len": max_len,
            "categories": dict(sorted(Counter(r["category"] for r in split.records).items())),
            "dropped": dict(result.dropped),
            "truncated": dict(result.truncated),
            "tokens": int(split.lengths.sum()),
            "label_tokens": split.num_label_tokens,
            "length": length_stats(split.lengths),
        }
    timings["tokenize"] = time.perf_counter() - start
    stats["tokenize_seconds"] = round(timings["tokenize"], 3)

    if len(splits["train"]) == 0:
        raise DataError(
            f"no training example left from {len(train_idx)} records of {loaded.description}: "
            f"dropped {stats['splits']['train']['dropped']} (is data.max_seq_len={cfg.max_seq_len} too small?)"
        )
    if len(val_idx) and len(splits["validation"]) == 0:
        raise DataError(
            f"no validation example left from {len(val_idx)} records: dropped "
            f"{stats['splits']['validation']['dropped']} (is data.val_max_seq_len={val_max_seq_len} too small?)"
        )

    def write(tmp: Path) -> None:
        for name, split in splits.items():
            split.save(tmp, name)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False), encoding="utf-8")

    start = time.perf_counter()
    write_entry(path, write)
    timings["cache_write"] = time.perf_counter() - start
    return PreparedData(splits["train"], splits["validation"], stats, path, cache_hit=False, timings=timings)

