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


RECORD = {"instruction": "Name a café in Zürich.", "response": "Café Sprüngli.", "category": "open_qa"}


def test_a_utf8_bom_is_accepted_in_jsonl_and_json(tmp_path):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + (json.dumps(RECORD, ensure_ascii=False) + "\n").encode() * 2)
    assert [r["instruction"] for r in load_local_file(jsonl).records] == [RECORD["instruction"]] * 2
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([RECORD], ensure_ascii=False).encode())
    assert load_local_file(array).records[0]["response"] == RECORD["response"]


def test_latin1_line_names_file_and_line_or_is_skipped_and_counted(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps(RECORD, ensure_ascii=False).encode()
    path.write_bytes(good + b"\n" + json.dumps(RECORD, ensure_ascii=False).encode("latin-1") + b"\n" + good + b"\n")
    with pytest.raises(DataError, match=rf"{path}, line 2: not UTF-8 text \(byte 0xe9 at column \d+\)"):
        load_local_file(path)
    loaded = load_local_file(path, invalid_records="skip")
    assert len(loaded.records) == 2
    assert [where for where, _ in loaded.invalid] == [f"{path}, line 2"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_utf16_and_utf32_files_are_named(tmp_path, encoding):
    for suffix in (".jsonl", ".json"):
        path = tmp_path / f"wide{suffix}"
        text = json.dumps(RECORD) if suffix == ".jsonl" else json.dumps([RECORD])
        path.write_bytes(text.encode(encoding))
        with pytest.raises(DataError, match=rf"{path}: the file is {encoding.upper()} text; save it as UTF-8"):
            load_local_file(path, invalid_records="skip")


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_utf16_and_utf32_files_without_a_bom_are_named(tmp_path, encoding):
    """What some editors and PowerShell's redirection write; not "malformed JSON" on every line."""
    for suffix in (".jsonl", ".json"):
        path = tmp_path / f"wide{suffix}"
        text = json.dumps(RECORD) + "\n" if suffix == ".jsonl" else json.dumps([RECORD])
        path.write_bytes(text.encode(encoding))
        name = encoding[:6].upper()
        with pytest.raises(DataError, match=rf"{path}: the file looks like {name} text without a byte-order mark"):
            load_local_file(path, invalid_records="skip")


def test_binary_files_name_file_and_line(tmp_path):
    path = tmp_path / "binary.json"
    path.write_bytes(b'[{"instruction": "a",\n "response": "\x89PNG\x00\xff"}]')
    with pytest.raises(DataError, match=rf"{path}, line 2: not UTF-8 text"):
        load_local_file(path)
    path = tmp_path / "binary.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)  # an image renamed .jsonl
    with pytest.raises(DataError, match=rf"{path}, line 1: not UTF-8 text"):
        load_local_file(path)
    with pytest.raises(DataError, match=rf"{path}: no valid record \(first problem: {path}, line 1: not UTF-8"):
        load_local_file(path, invalid_records="skip")


@pytest.mark.parametrize("source", ["data/my_records", "./records", "/nonexistent/dolly", "~/no/such/file", "a/b/c"])
def test_a_missing_local_path_without_suffix_is_not_looked_up_on_the_hub(source, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match=rf"data.source='{source}': no such file or directory"):
        load_records(source)


def test_a_missing_owner_slash_name_says_it_is_neither_local_nor_on_the_hub(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data.source='records/dolly': no such local file or directory, and could not"):
        load_records("records/dolly")
