"""Reading the small JSON files that runs, checkpoints and caches keep (state, configs, indexes, statistics), with
errors that name the file and say what is wrong with it, as the caller's own error type.

Every such file is UTF-8 (a byte-order mark, which some editors add, is accepted) and holds one JSON object.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_utf8_text(path: str | os.PathLike, error: type[Exception]) -> str:
    """The text of `path` decoded as UTF-8 (a BOM accepted); `error(message)` naming the file when it cannot be
    read or is not UTF-8 (with the offset of the first bad byte)."""
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.start}); the file is damaged") from None
    except OSError as err:
        raise error(f"{path}: cannot be read ({err.strerror or err})") from None


def read_json_object(path: str | os.PathLike, error: type[Exception], what: str) -> dict[str, Any]:
    """The JSON object in `path`. `what` says what the file should be ("a valid training state"); a file that is
    not UTF-8, not JSON (line and column named) or not an object is `error(message)` naming the file."""
    text = read_utf8_text(path, error)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}: not {what} (invalid JSON at line {err.lineno} column {err.colno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: not {what} (expected a JSON object, found {type(data).__name__})")
    return data
