"""Tokenized splits are cached under a key of everything that changes them, written atomically, reused."""

import dataclasses
import os
import shutil

import pytest

from harness.data import TemplateConfig, load_tokenizer, prepare_dataset
from harness.data.cache import default_cache_dir, entry_dir, write_entry
from models.tokenizer import default_tokenizer_path

from tests.data.conftest import dolly_records, write_jsonl


def prepare(cfg, tokenizer):
    return prepare_dataset(cfg, tokenizer, cache_dir=cfg.cache_dir, progress=False)


def same_examples(a, b):
    return [x["input_ids"] for x in a.train] == [x["input_ids"] for x in b.train] and [
        x["labels"] for x in a.validation
    ] == [x["labels"] for x in b.validation]


def test_second_prepare_reuses_the_cache(small_config, tokenizer):
    first = prepare(small_config, tokenizer)
    second = prepare(small_config, tokenizer)
    assert not first.cache_hit and second.cache_hit
    assert second.cache_path == first.cache_path
    assert "tokenize" not in second.timings  # nothing was tokenized
    assert same_examples(first, second)
    assert second.stats == first.stats
    assert [x["record"] for x in second.validation] == [x["record"] for x in first.validation]


@pytest.mark.parametrize(
    "change",
    [
        {"max_seq_len": 48},
        {"val_max_seq_len": 128},
        {"template": TemplateConfig(response_header="\n\nAnswer:\n")},
        {"split_seed": 1},
        {"val_fraction": 0.3},
        {"stratify": False},
        {"max_records": 50},
    ],
    ids=lambda change: next(iter(change)),
)
def test_any_key_change_invalidates(small_config, tokenizer, change):
    before = prepare(small_config, tokenizer)
    after = prepare(dataclasses.replace(small_config, **change), tokenizer)
    assert not after.cache_hit and after.cache_path != before.cache_path


def test_source_content_and_tokenizer_are_part_of_the_key(small_config, small_source, tokenizer, tmp_path):
    before = prepare(small_config, tokenizer)
    write_jsonl(small_source, dolly_records(61))  # same path, different content
    edited = prepare(small_config, tokenizer)
    assert not edited.cache_hit and edited.cache_path != before.cache_path
    shutil.copyfile(default_tokenizer_path().with_name("mistral_instruct_tokenizer_240216.model.v2"), tmp_path / "tokenizer.model")
    other = prepare(small_config, load_tokenizer(tmp_path))
    assert not other.cache_hit and other.cache_path != edited.cache_path


def test_two_tokenizers_give_two_cache_entries(small_config, tokenizer, smollm2_tokenizer):
    mistral = prepare(small_config, tokenizer)
    smollm2 = prepare(small_config, smollm2_tokenizer)
    assert not smollm2.cache_hit and smollm2.cache_path != mistral.cache_path
    assert smollm2.stats["key"]["tokenizer"] == smollm2_tokenizer.identity != tokenizer.identity
    # Each is reused by its own tokenizer, with that tokenizer's conventions: BOS only where the model adds it.
    again = prepare(small_config, smollm2_tokenizer), prepare(small_config, tokenizer)
    assert [p.cache_hit for p in again] == [True, True]
    assert [p.cache_path for p in again] == [smollm2.cache_path, mistral.cache_path]
    assert mistral.train[0]["input_ids"][0] == tokenizer.bos_id
    assert smollm2_tokenizer.bos_id not in smollm2.train.tokens
    example = smollm2.validation[0]
    response = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert response[-1] == smollm2_tokenizer.eos_id
    assert smollm2_tokenizer.decode(response[:-1], continuation=True) == example["record"]["response"]


def test_cache_writes_are_atomic_and_leave_no_temporary_files(small_config, tokenizer):
    prepared = prepare(small_config, tokenizer)
    siblings = os.listdir(prepared.cache_path.parent)
    assert siblings == [prepared.cache_path.name]
    # An entry without its completion marker (a crashed writer) is rebuilt, not read.
    (prepared.cache_path / "stats.json").unlink()
    rebuilt = prepare(small_config, tokenizer)
    assert not rebuilt.cache_hit and (rebuilt.cache_path / "stats.json").is_file()


def test_concurrent_writer_of_the_same_entry_keeps_the_first(tmp_path):
    target = entry_dir(tmp_path, "k")

    def writer(text):
        def write(tmp):
            (tmp / "data.txt").write_text(text)
            (tmp / "stats.json").write_text("{}")
        return write

    write_entry(target, writer("first"))
    write_entry(target, writer("second"))  # lost the race: discarded, no error
    assert (target / "data.txt").read_text() == "first"
    assert os.listdir(target.parent) == ["k"]


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("QLORA_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "mistral-dolly-qlora"


def _overwrite_middle(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = b"\x00" * 64
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, damaged_file",
    [
        (lambda entry: _overwrite_middle(entry / "train.npz"), "train.npz"),
        (lambda entry: (entry / "validation.npz").write_bytes(b"PK\x03\x04 truncated"), "validation.npz"),
        (lambda entry: (entry / "train.records.jsonl").write_text('{"a": 1}\n', encoding="utf-8"), "train.records.jsonl"),
        (lambda entry: (entry / "validation.records.jsonl").write_bytes(b"\xff\xfe\x00"), "validation.records.jsonl"),
        (lambda entry: (entry / "stats.json").write_text("{trunc", encoding="utf-8"), "stats.json"),
    ],
    ids=["npz-overwritten", "npz-truncated", "records-count", "records-binary", "stats-truncated"],
)
def test_a_damaged_cache_entry_is_reported_and_rebuilt(small_config, tokenizer, capfd, damage, damaged_file):
    first = prepare(small_config, tokenizer)
    damage(first.cache_path)
    again = prepare(small_config, tokenizer)
    assert not again.cache_hit and again.cache_path == first.cache_path
    assert same_examples(first, again)
    err = capfd.readouterr().err
    assert "damaged cache entry" in err and str(first.cache_path / damaged_file) in err, err
    third = prepare(small_config, tokenizer)  # the rebuilt entry is whole again
    assert third.cache_hit and same_examples(first, third)
    assert not [p for p in first.cache_path.parent.iterdir() if p.name.startswith(".")], "nothing left aside"


def test_cache_folders_and_files_follow_the_umask(small_config, tokenizer):
    old = os.umask(0o002)  # a team's shared cache: group-writable
    try:
        entry = prepare(small_config, tokenizer).cache_path
    finally:
        os.umask(old)
    assert entry.stat().st_mode & 0o777 == 0o775
    assert all(p.stat().st_mode & 0o777 == 0o664 for p in entry.iterdir())
