"""prepare_dataset end to end: splits, stats, the printed report, clear errors."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import harness.schema  # noqa: F401  (registers the data schema)
from harness.data import IGNORE_INDEX, DataConfig, DataError, prepare_dataset, print_report
from harness.data.records import embedded_sample_path, load_local_file

from tests.data.conftest import dolly_records, write_jsonl

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def test_prepared_splits_hold_examples_and_their_records(small_config, tokenizer):
    prepared = prepare_dataset(small_config, tokenizer, cache_dir=small_config.cache_dir, progress=False)
    assert len(prepared.train) == 48 and len(prepared.validation) == 12
    instructions = [x["record"]["instruction"] for x in (*prepared.train, *prepared.validation)]
    assert sorted(instructions) == sorted(r["instruction"] for r in dolly_records(60))
    example = prepared.validation[0]
    labelled = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled[:-1], continuation=True) == example["record"]["response"]
    stats = prepared.stats["splits"]
    assert stats["train"]["categories"] == {"closed_qa": 16, "open_qa": 16, "summarization": 16}
    assert stats["validation"]["length"]["max"] == int(prepared.validation.lengths.max())
    assert stats["train"]["tokens"] == int(prepared.train.lengths.sum())


def test_report_shows_counts_drops_and_percentiles(tmp_path, tokenizer):
    rows = dolly_records(40) + [{"instruction": "Blank answer", "response": " "}]
    rows.append({"instruction": "Long answer", "response": "word " * 200, "category": "open_qa"})
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(source=str(source), max_seq_len=64, val_fraction=0.0, cache_dir=str(tmp_path / "c"))
    prepared = prepare_dataset(cfg, tokenizer, progress=False)
    out = io.StringIO()
    print_report(prepared, file=out)
    report = out.getvalue()
    assert "open_qa" in report and "summarization" in report
    assert "dropped 1 empty response" in report
    assert "truncated 1 response" in report
    assert "length p90" in report and "length p99" in report
    assert f"{len(prepared.train):>12}" in report  # total examples


def test_max_seq_len_too_small_for_every_prompt_is_a_clear_error(small_config, tokenizer):
    small_config.max_seq_len = 8
    with pytest.raises(DataError, match=r"no training example left .*prompt longer than max_seq_len.*max_seq_len=8"):
        prepare_dataset(small_config, tokenizer, cache_dir=small_config.cache_dir, progress=False)
    small_config.max_seq_len = 1
    with pytest.raises(DataError, match="data.max_seq_len must be at least 2"):
        prepare_dataset(small_config, tokenizer, cache_dir=small_config.cache_dir, progress=False)


def test_composed_hydra_config_prepares_the_embedded_sample(tmp_path, tokenizer):
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose(
            "train",
            overrides=["data=dolly_sample", "data.max_records=null", "data.max_seq_len=128", "data.val_max_seq_len=256"],
        )
    prepared = prepare_dataset(cfg.data, tokenizer, cache_dir=tmp_path, progress=False)
    records = load_local_file(embedded_sample_path()).records
    assert len(prepared.train) + len(prepared.validation) == len(records)
    assert prepared.train.lengths.max() <= 128 and prepared.validation.lengths.max() <= 256
    # Every category of the sample is in both splits, with and without context.
    splits = prepared.stats["splits"]
    assert len(splits["train"]["categories"]) == len(splits["validation"]["categories"]) == 8
    assert {bool(x["record"]["context"]) for x in prepared.validation} == {True, False}
    assert np.all(prepared.train.prompt_lengths < prepared.train.lengths)  # a labelled token in every example


def test_skipped_records_are_counted_by_kind(tmp_path, tokenizer):
    """Under `skip`, the count line stays one short line however many bad lines differ in their details
    (columns, bytes); the examples keep the details."""
    good = [json.dumps(row).encode() for row in dolly_records(40)]
    bad = [
        '{"instruction": "Caf\u00e9", "response": "x"}'.encode("latin-1"),
        '{"instruction": "A longer caf\u00e9", "response": "x"}'.encode("latin-1"),
        '{"instruction": "q", "response": "\u00e9t\u00e9"}'.encode("latin-1"),
        b'{"instruction": "q", "response": "a\tb"}',  # a raw tab: json's "Invalid control character at"
        b'{"instruction": "q", "response": ',
        b'{"instruction": "q", "response": 3}',
    ]
    source = tmp_path / "d.jsonl"
    source.write_bytes(b"\n".join(good[:20] + bad + good[20:]) + b"\n")
    cfg = DataConfig(source=str(source), invalid_records="skip", cache_dir=str(tmp_path / "c"))
    prepared = prepare_dataset(cfg, tokenizer, progress=False)
    assert prepared.stats["invalid_records"] == {
        "not UTF-8 text": 3, "malformed JSON": 2, "field 'response' must be a string, got int": 1,
    }
    out = io.StringIO()
    print_report(prepared, file=out)
    report = out.getvalue()
    assert (
        "invalid records skipped: 6 (3 not UTF-8 text, 2 malformed JSON, 1 field 'response' must be a string, "
        f"got int) from {source}" in report
    )
    assert f"{source}, line 24: malformed JSON (Invalid control character at column " in report
