"""Atomic writes: the old file or the new one, never a temporary file left behind, the umask's modes, and a
failed write that names its path."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from models.atomic_files import (
    DiskWriteError,
    atomic_save_safetensors,
    atomic_write_text,
    make_temp_dir,
    process_umask,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_files_and_folders_get_the_process_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        assert process_umask() == mask
        atomic_write_text(tmp_path / "a.json", "{}")
        atomic_save_safetensors(tmp_path / "w.safetensors", {"x": mx.ones((2,))})
        folder = make_temp_dir(tmp_path, ".entry.")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")

    class Unencodable(str):
        def encode(self, *args):
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a write

    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, Unencodable("new"))
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


DISK_FULL = """
import resource, signal, sys
from pathlib import Path
import mlx.core as mx
from models.atomic_files import DiskWriteError, atomic_save_safetensors, atomic_write_text
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
out = Path(sys.argv[1])
for write in (lambda: atomic_write_text(out / "big.json", "x" * 100_000),
              lambda: atomic_save_safetensors(out / "big.safetensors", {"w": mx.zeros((100_000,))})):
    try:
        write()
    except DiskWriteError as err:
        print(err)
"""


def test_a_full_disk_names_the_path(tmp_path):
    """A file-size limit stands in for a full disk: the write fails the same way, for a path of ours."""
    proc = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(tmp_path)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)}, check=True,
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout + proc.stderr
    assert lines[0].startswith(f"{tmp_path / 'big.json'}: cannot write")
    assert lines[1].startswith(f"{tmp_path / 'big.safetensors'}: cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no temporary file is left behind"
    assert issubclass(DiskWriteError, OSError)
