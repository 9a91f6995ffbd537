"""Sources and bad input: every problem names the file, line (or row) and field, or is a counted skip."""

import json

import pyarrow
import pyarrow.parquet
import pytest

from harness.data import DataError, load_records
from harness.data.records import load_hub_dataset, load_local_file

from tests.data.conftest import dolly_records, write_jsonl


def test_jsonl_json_and_parquet_give_the_same_records(tmp_path):
    rows = dolly_records(5)
    rows[1].pop("context")  # optional fields may be missing
    rows[2]["category"] = None
    jsonl = write_jsonl(tmp_path / "d.jsonl", ["", *map(json.dumps, rows), "   "])  # blank lines are skipped
    array = tmp_path / "d.json"
    array.write_text(json.dumps(rows, indent=2))
    parquet = tmp_path / "d.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(dolly_records(5)), parquet)
    expected = load_records(str(jsonl)).records
    assert len(expected) == 5 and expected[1]["context"] == "" and expected[2]["category"] == "uncategorized"
    assert load_records(str(array)).records == expected
    assert [r["instruction"] for r in load_records(str(parquet)).records] == [r["instruction"] for r in expected]


def test_fields_are_stripped_and_extra_fields_ignored(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "  Hi \n", "response": "\tHello ", "id": 3}])
    assert load_records(str(path)).records == [
        {"instruction": "Hi", "context": "", "response": "Hello", "category": "uncategorized"}
    ]


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [*dolly_records(3), '{"instruction": "x", "response": ', *dolly_records(1)])
    with pytest.raises(DataError, match=r"bad\.jsonl, line 4: malformed JSON"):
        load_records(str(path))


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"instruction": "a", "response": "b"},\n{"instruction": oops}\n]')
    with pytest.raises(DataError, match=r"bad\.json, line 3: malformed JSON"):
        load_records(str(path))


@pytest.mark.parametrize(
    "row, message",
    [
        ({"context": "", "response": "r"}, r"line 2: missing required field 'instruction'"),
        ({"instruction": "i", "context": ""}, r"line 2: missing required field 'response'"),
        ({"instruction": "i", "response": 7}, r"line 2: field 'response' must be a string, got int"),
        ({"instruction": ["i"], "response": "r"}, r"line 2: field 'instruction' must be a string, got list"),
        ({"instruction": "i", "response": "r", "context": {"a": 1}}, r"line 2: field 'context' must be a string"),
        ([1, 2], r"line 2: expected a JSON object"),
    ],
)
def test_invalid_record_is_an_error_naming_file_line_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [*dolly_records(1), row, *dolly_records(1)])
    with pytest.raises(DataError, match=message) as error:
        load_records(str(path))
    assert str(path) in str(error.value)


def test_parquet_non_string_field_names_the_row(tmp_path):
    path = tmp_path / "d.parquet"
    pyarrow.parquet.write_table(
        pyarrow.Table.from_pylist([{"instruction": "a", "response": "b"}, {"instruction": "c", "response": None}]), path
    )
    with pytest.raises(DataError, match=r"d\.parquet, row 1: missing required field 'response'"):
        load_records(str(path))


def test_skip_policy_drops_and_counts_invalid_records(tmp_path):
    rows = [*dolly_records(3), "{not json", {"instruction": "x"}, {"instruction": 1, "response": "y"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    loaded = load_records(str(path), invalid_records="skip")
    assert len(loaded.records) == 3
    assert [where.rsplit(", ", 1)[1] for where, _ in loaded.invalid] == ["line 4", "line 5", "line 6"]
    assert [reason.split(" (")[0] for _, reason in loaded.invalid] == [
        "malformed JSON", "missing required field 'response'", "field 'instruction' must be a string, got int",
    ]


def test_empty_and_missing_files_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file holds no records"):
        load_records(str(empty))
    with pytest.raises(DataError, match="is not a file"):
        load_records(str(tmp_path / "typo.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_local_file(tmp_path / "d.csv")


def test_fingerprint_follows_the_file_content(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", dolly_records(3))
    before = load_records(str(path)).fingerprint
    assert load_records(str(path)).fingerprint == before
    write_jsonl(path, dolly_records(4))
    assert load_records(str(path)).fingerprint != before


@pytest.fixture
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    """Point the datasets cache (read when `datasets` was imported) into tmp_path."""
    import datasets

    cache = tmp_path / "hf" / "datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_dataset_directory_goes_through_datasets_load_dataset(tmp_path, datasets_cache_in_tmp):
    # A local dataset repository (the layout of a Hub dataset snapshot): same code path as a Hub id.
    repo = tmp_path / "my-dolly"
    (repo / "data").mkdir(parents=True)
    write_jsonl(repo / "data" / "train.jsonl", dolly_records(7))
    loaded = load_records(str(repo))
    assert loaded.records == load_records(str(repo / "data" / "train.jsonl")).records
    assert loaded.fingerprint.startswith(f"hub:{repo}@default:train:")
    assert datasets_cache_in_tmp.is_dir()  # datasets' Arrow cache went to tmp_path, not the home directory


def test_hub_dataset_offline_and_not_cached_is_a_clear_error(tmp_path, monkeypatch, datasets_cache_in_tmp):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"could not load dataset 'databricks/databricks-dolly-15k'.*offline") as error:
        load_hub_dataset("databricks/databricks-dolly-15k")
    assert "local .jsonl" in str(error.value)
