"""Read Dolly-shaped records from a local file, a dataset directory, the Hub, or the embedded sample.

A record is a dict with four strings: `instruction`, `context` (may be empty), `response`, `category`.
Rules, applied to every source:
- `instruction` and `response` are required strings; `context` and `category` are optional strings
  (missing or null: "" and "uncategorized"). Other fields are ignored.
- Leading and trailing whitespace of every field is removed.
- A malformed JSON line, a record that is not an object, a missing required field or a non-string field is an
  error naming the file, line (or row) and field, unless `invalid_records="skip"`: then it is dropped and
  counted under its reason, with its location kept in `LoadedRecords.invalid`.
- An empty file (no records at all) is always an error.
Records whose instruction or response is empty after stripping are valid but unusable; `encode` drops and
counts them.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.data.config import EMBEDDED_SAMPLE
from harness.data.errors import DataError

REQUIRED_FIELDS = ("instruction", "response")
OPTIONAL_FIELDS = {"context": "", "category": "uncategorized"}
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
INVALID_POLICIES = ("error", "skip")


@dataclass
class LoadedRecords:
    """Valid records of a source, how to recognise that source again, and what was skipped."""

    records: list[dict[str, str]]
    fingerprint: str  # sha256 of the file, or Hub id + revision + datasets' own fingerprint
    description: str  # where the records came from, for reports
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (location, reason) of skipped records


def embedded_sample_path() -> Path:
    """Path of the Dolly-format sample shipped in the package (`harness/data/dolly_sample.jsonl`)."""
    return Path(str(importlib.resources.files("harness.data") / "dolly_sample.jsonl"))


def validate_record(raw: object, where: str) -> dict[str, str]:
    """A clean record from one raw row; raises `DataError` naming `where` and the field when it is invalid."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object with 'instruction' and 'response', got {type(raw).__name__}")
    record = {}
    for name in REQUIRED_FIELDS:
        if raw.get(name) is None:
            raise DataError(f"{where}: missing required field {name!r}")
    for name in ("instruction", "context", "response", "category"):
        value = raw.get(name)
        if value is None:
            value = OPTIONAL_FIELDS[name]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__} ({value!r:.60})")
        record[name] = value.strip()
    if not record["category"]:
        record["category"] = OPTIONAL_FIELDS["category"]
    return record


def _collect(rows: Iterable[tuple[str, object]], policy: str, loaded: LoadedRecords) -> None:
    """Validate `(location, raw_row)` pairs into `loaded`; a raw row that is a `DataError` is a parse failure."""
    for where, raw in rows:
        try:
            if isinstance(raw, DataError):
                raise raw
            loaded.records.append(validate_record(raw, where))
        except DataError as error:
            if policy == "error":
                raise
            loaded.invalid.append((where, str(error).removeprefix(f"{where}: ")))


def reason_kind(reason: str) -> str:
    """What a skipped record's reason says without its details (`not UTF-8 text`, `malformed JSON`, `field
    'response' must be a string, got int`): the key skipped records are counted under."""
    return reason.split(" (", 1)[0]


# Byte-order marks of the encodings a text editor may save instead of UTF-8.
FOREIGN_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
                b"\xfe\xff": "UTF-16"}


def _check_not_utf16(path: Path, head: bytes) -> None:
    for bom, name in FOREIGN_BOMS.items():
        if head.startswith(bom):
            raise DataError(f"{path}: the file is {name} text; save it as UTF-8")
    # JSON starts with an ASCII character; in UTF-16/32 without a byte-order mark its other bytes are NUL.
    if len(head) == 4 and 0 in head[:2]:
        name = "UTF-32" if head[1:4] == b"\0\0\0" or head[:3] == b"\0\0\0" else "UTF-16"
        raise DataError(f"{path}: the file looks like {name} text without a byte-order mark; save it as UTF-8")


def undecodable_line(
    source: str | Path, line_number: int, err: UnicodeDecodeError, remedy: str = "save the file as UTF-8"
) -> DataError:
    """The error for line `line_number` of `source` (a file, or "stdin"), which `err` could not decode as UTF-8:
    the first bad byte and its column, and what to do."""
    return DataError(
        f"{source}, line {line_number}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at column "
        f"{err.start + 1}); {remedy}"
    )


def _json_problem(error: json.JSONDecodeError) -> str:
    """`Expecting value at column 5` (json's own message may already end in "at")."""
    return f"{error.msg.removesuffix(' at')} at column {error.colno}"


def _jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    """Rows of a JSON Lines file, read as UTF-8 (a leading BOM is accepted); an undecodable or malformed
    line becomes a `DataError` row naming the line, so the `skip` policy can count it."""
    with path.open("rb") as f:
        _check_not_utf16(path, f.read(4))
        f.seek(0)
        for line_number, raw_line in enumerate(f, start=1):
            where = f"{path}, line {line_number}"
            try:
                line = raw_line.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield where, undecodable_line(path, line_number, error)
                continue
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) carry no record
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as error:
                yield where, DataError(f"{where}: malformed JSON ({_json_problem(error)})")


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    data_bytes = path.read_bytes()
    _check_not_utf16(path, data_bytes[:4])
    try:
        text = data_bytes.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line_start = data_bytes.rfind(b"\n", 0, error.start) + 1
        column_error = UnicodeDecodeError("utf-8", data_bytes[line_start:], error.start - line_start, error.end - line_start, error.reason)
        raise undecodable_line(path, data_bytes.count(b"\n", 0, error.start) + 1, column_error) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {error.lineno}: malformed JSON ({_json_problem(error)})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records (or JSON Lines in a .jsonl file)")
    for index, raw in enumerate(data):
        yield f"{path}, record {index}", raw


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet  # only needed for parquet sources

    try:
        table = pyarrow.parquet.read_table(path)
    except Exception as error:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable parquet file ({error})") from None
    for index, raw in enumerate(table.to_pylist()):
        yield f"{path}, row {index}", raw


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_local_file(path: str | Path, *, invalid_records: str = "error") -> LoadedRecords:
    """Records of a local `.jsonl`, `.json` (array of objects) or `.parquet` file, validated (module docstring)."""
    path = Path(path)
    if invalid_records not in INVALID_POLICIES:
        raise DataError(f"data.invalid_records must be one of {INVALID_POLICIES}, got {invalid_records!r}")
    if not path.is_file():
        raise DataError(f"data source {str(path)!r} is not a file")
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows}
    if path.suffix not in readers:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {LOCAL_SUFFIXES}")
    loaded = LoadedRecords(records=[], fingerprint=f"file:{file_sha256(path)}", description=str(path))
    _collect(readers[path.suffix](path), invalid_records, loaded)
    if not loaded.records and not loaded.invalid:
        raise DataError(f"{path}: the file holds no records")
    if not loaded.records:
        raise DataError(f"{path}: no valid record (first problem: {loaded.invalid[0][0]}: {loaded.invalid[0][1]})")
    return loaded


def load_hub_dataset(
    name: str, *, revision: str | None = None, split: str = "train", invalid_records: str = "error"
) -> LoadedRecords:
    """Records of a Hugging Face dataset (Hub id or local dataset directory) via `datasets.load_dataset`.

    Uses the datasets cache and honours offline mode (`HF_HUB_OFFLINE=1` / `HF_DATASETS_OFFLINE=1`): offline with
    nothing cached is a `DataError` that says so.
    """
    import datasets  # slow to import; only Hub sources need it

    try:
        dataset = datasets.load_dataset(name, revision=revision, split=split)
    except Exception as error:  # network, offline, missing repo or split: one clear message
        offline = datasets.config.HF_HUB_OFFLINE
        hint = " (offline mode is on and it is not in the datasets cache)" if offline else ""
        raise DataError(
            f"could not load dataset {name!r} split {split!r}{hint}: {type(error).__name__}: {error}. "
            "Download it once with network access, or set data.source to a local .jsonl/.json/.parquet file."
        ) from error
    fingerprint = f"hub:{name}@{revision or 'default'}:{split}:{dataset._fingerprint}"
    loaded = LoadedRecords(records=[], fingerprint=fingerprint, description=f"{name} ({split})")
    rows = ((f"{name} {split} row {index}", row) for index, row in enumerate(dataset))
    _collect(rows, invalid_records, loaded)
    if not loaded.records:
        raise DataError(f"dataset {name!r} split {split!r} holds no valid record")
    return loaded


def looks_like_a_path(source: str) -> bool:
    """A source that can only mean a local path: absolute, `./` `../` `~`, or more than one `/` (a Hub id is
    `owner/name`)."""
    first = source.split("/")[0]
    return (
        source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1
        or ("/" in source and Path(first).is_dir())  # `data/x` where ./data exists
    )


def load_records(
    source: str, *, revision: str | None = None, hub_split: str = "train", invalid_records: str = "error"
) -> LoadedRecords:
    """Records of `source`: `embedded:dolly_sample`, a local file, a local dataset directory or a Hub id."""
    if source == EMBEDDED_SAMPLE:
        loaded = load_local_file(embedded_sample_path(), invalid_records=invalid_records)
        loaded.description = f"{EMBEDDED_SAMPLE} ({loaded.description})"
        return loaded
    path = Path(source).expanduser()
    if path.suffix in LOCAL_SUFFIXES or path.is_file():
        return load_local_file(path, invalid_records=invalid_records)
    if looks_like_a_path(source) and not path.exists():
        raise DataError(f"data.source={source!r}: no such file or directory")
    try:
        return load_hub_dataset(source, revision=revision, split=hub_split, invalid_records=invalid_records)
    except DataError as error:
        if path.exists():
            raise
        # `owner/name` may be a Hub id or a relative path: say both were tried.
        raise DataError(f"data.source={source!r}: no such local file or directory, and {error}") from error
