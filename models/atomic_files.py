"""Files written whole or not at all: a temporary sibling, flushed to disk, renamed into place.

The one helper for every atomic write of the project (run state, adapters, exports, caches). Guarantees:
- readers see the old file or the new one, never a half-written one (`os.replace` of a sibling);
- the new file's bytes are on disk before the rename (`fsync`), so a power cut cannot leave an empty file;
- the temporary file is removed when the write fails (disk full, Ctrl-C);
- a failed write names the path (`DiskWriteError`), since MLX's own message ("Unable to write N bytes") does not;
- new files and folders get the process's umask like any `open()`, not the private modes (0600/0700) that
  `tempfile` uses: run directories and caches are meant to be shared by a team. None of them holds secrets.
"""

from __future__ import annotations

import errno as _errno
import os
import tempfile
from pathlib import Path

import mlx.core as mx


class DiskWriteError(OSError):
    """A file that could not be written (disk full, no permission, ...); the message names the path."""

    def __init__(self, path: Path, reason: str, errno: int | None = None):
        super().__init__(errno, reason, str(path))
        # MLX's short writes carry no errno: most likely a full disk too.
        full = errno is None or errno in (_errno.ENOSPC, _errno.EFBIG, getattr(_errno, "EDQUOT", _errno.ENOSPC))
        self.message = f"{path}: cannot write ({reason}{'; is the disk full?' if full else ''})"

    def __str__(self) -> str:
        return self.message

    @classmethod
    def from_error(cls, path: str | os.PathLike, err: BaseException) -> DiskWriteError:
        """The error for a write of `path` that failed with `err` (an `OSError`'s reason and errno, when it has
        them; MLX's write errors are RuntimeErrors without)."""
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        return cls(Path(path), reason, err.errno if isinstance(err, OSError) else None)


def process_umask() -> int:
    """The process's file-mode creation mask (read without changing it, where Linux allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting, then put back at once
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (module docstring)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~process_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise DiskWriteError.from_error(path, err) from err
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (module docstring)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(
    path: str | os.PathLike, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None
) -> None:
    """`mx.save_safetensors` to a temporary file beside `path`, flushed to disk, then renamed into place."""
    path = Path(path)
    tmp = path.parent / f".{path.stem}.{os.getpid()}.tmp.safetensors"
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
        tmp.chmod(0o666 & ~process_umask())  # MLX creates its files 0644 whatever the umask
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):  # MLX reports a short write as RuntimeError
            raise DiskWriteError.from_error(path, err) from err
        raise


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A fresh folder in `parent` (created) to fill and rename into place, with the umask's mode."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    tmp.chmod(0o777 & ~process_umask())
    return tmp
