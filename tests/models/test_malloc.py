"""models.malloc: on glibc, `import models` makes medium-sized blocks come from the reusable heap, not mmap."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Counts the blocks glibc serves with their own mmap (mallinfo2().hblks) around one 8 MB allocation.
PROBE = """
import ctypes, models
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblks
block = libc.malloc(8 << 20)
print(models.malloc.tuned, libc.mallinfo2().hblks - before)
libc.free(ctypes.c_void_p(block))
"""


def _probe(**env) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env}, check=True)
    return proc.stdout.split()


def _has_mallinfo2() -> bool:
    try:
        import ctypes

        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_mallinfo2(), reason="glibc >= 2.33 only")
def test_medium_blocks_come_from_the_heap_once_models_is_imported():
    assert _probe(QLORA_MALLOC="auto") == ["True", "0"]  # served from the heap, reusable after free
    assert _probe(QLORA_MALLOC="default") == ["False", "1"]  # glibc's default: a fresh mmap
