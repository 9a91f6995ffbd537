"""models.blas: an optimized BLAS is opened before MLX on Linux, and the choice can be overridden."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.blas import _CANDIDATES

REPO = Path(__file__).resolve().parents[2]
PROBE = "import models, mlx.core as mx; print(models.blas.loaded_blas); print(mx.ones((2, 2)) @ mx.ones((2, 2)))"


def _probe(**env) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env}, check=True)
    return proc.stdout.splitlines()


def test_off_keeps_mlx_own_blas():
    assert _probe(QLORA_BLAS="off")[0] == "None"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="macOS uses Accelerate")
def test_an_installed_openblas_is_loaded_and_matmuls_stay_correct():
    installed = [p for p in _CANDIDATES if os.path.exists(p)]
    if not installed:
        pytest.skip("no system OpenBLAS here")
    out = _probe(QLORA_BLAS="auto")
    assert out[0] == installed[0]
    assert "[[2, 2]," in out[1]
    assert _probe(QLORA_BLAS=installed[-1])[0] == installed[-1]


def test_nothing_is_loaded_once_mlx_is_imported():
    code = "import mlx.core, models.blas as b; print(b.load_fast_blas())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert proc.stdout.strip() == "None"


def test_thread_count_can_be_set_and_read_back_where_a_blas_was_loaded():
    from models import blas

    before = blas.blas_threads()
    if before is None:
        assert blas.set_blas_threads(1) is False  # nothing to set: MLX's own BLAS or Accelerate
        return
    try:
        assert blas.set_blas_threads(1) is True
        assert blas.blas_threads() == 1
        assert blas.set_blas_threads(2) is True
        assert blas.blas_threads() == 2
    finally:
        blas.set_blas_threads(before)
