"""On-disk cache of tokenized splits: `<cache_dir>/tokenized/<key>/`, written atomically, keyed by everything
that changes the tokens (source fingerprint, tokenizer identity, template, lengths, split settings)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from models.atomic_files import DiskWriteError, make_temp_dir

# Bump when the encoding rules change, so that caches written by older code are not reused.
ENCODING_VERSION = 2  # 2: BOS only when the tokenizer's model adds one
COMPLETE_MARKER = "stats.json"  # written last: a directory without it is not a cache entry


def default_cache_dir() -> Path:
    """`$QLORA_CACHE_DIR`, else `~/.cache/mistral-dolly-qlora`."""
    return Path(os.environ.get("QLORA_CACHE_DIR") or Path.home() / ".cache" / "mistral-dolly-qlora")


def cache_key(parts: Mapping[str, object]) -> str:
    """A short stable hash (hex, 20 chars) of JSON-serializable `parts` plus the encoding version."""
    payload = json.dumps({"encoding_version": ENCODING_VERSION, **parts}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def entry_dir(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir).expanduser() / "tokenized" / key


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_MARKER).is_file()


def write_entry(directory: Path, write: Callable[[Path], None]) -> None:
    """Fill a fresh temporary sibling directory with `write(tmp)` and rename it to `directory` in one step.

    Readers never see a half-written entry; when another process (a parallel sweep trial) finished the same
    entry first, its copy is kept and this one discarded (both hold the same tokens).
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(directory.parent, f".{directory.name}.")
    try:
        try:
            write(tmp)
        except DiskWriteError:
            raise
        except OSError as err:  # numpy's and Python's write errors do not say which file (a full disk)
            where = Path(err.filename) if err.filename else tmp
            raise DiskWriteError.from_error(where, err) from err
        if not is_complete(tmp):
            raise RuntimeError(f"cache writer did not write {COMPLETE_MARKER}")
        if directory.exists() and not is_complete(directory):
            shutil.rmtree(directory, ignore_errors=True)  # left by a writer that crashed before the rename
        try:
            os.replace(tmp, directory)
        except OSError:
            if not is_complete(directory):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def discard_entry(directory: Path) -> None:
    """Remove a (damaged) entry: renamed aside first, so no reader sees it half deleted."""
    aside = directory.with_name(f".{directory.name}.discarded-{os.getpid()}")
    try:
        os.replace(directory, aside)
    except OSError:
        return  # already gone (another process discarded or replaced it)
    shutil.rmtree(aside, ignore_errors=True)
