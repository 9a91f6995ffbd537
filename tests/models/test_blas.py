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


def test_threads_set_for_a_block_are_given_back_even_when_it_fails():
    from models import blas

    before = blas.blas_threads()
    if before is None:
        with blas.blas_threads_within(2):  # nothing to set: the block just runs
            pass
        return
    try:
        blas.set_blas_threads(1)
        with blas.blas_threads_within(2):
            assert blas.blas_threads() == 2
        assert blas.blas_threads() == 1
        with pytest.raises(RuntimeError, match="inside"):
            with blas.blas_threads_within(2):
                raise RuntimeError("inside")
        assert blas.blas_threads() == 1
    finally:
        blas.set_blas_threads(before)


CORE_PROBE = "import models; print(models.blas.openblas_core())"


def _core(**env) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    proc = subprocess.run([sys.executable, "-c", CORE_PROBE], capture_output=True, text=True, cwd=REPO,
                          env={**environ, **env}, check=True)
    return proc.stdout.strip()


def test_openblas_kernels_follow_the_cpu_flags(tmp_path):
    from models.blas import cpu_flags, openblas_core_for

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse3 avx2 fma avx512f avx512cd avx512bw avx512dq\nbogomips: 1\n")
    flags = cpu_flags(str(cpuinfo))
    assert openblas_core_for(flags) == "Haswell"  # AVX-512 without VL is not enough for the SkylakeX kernels
    assert openblas_core_for(flags | {"avx512vl"}) == "SkylakeX"
    assert openblas_core_for({"sse3", "avx"}) is None  # OpenBLAS's own detection decides
    assert cpu_flags(str(tmp_path / "missing")) == set()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="macOS uses Accelerate")
def test_the_loaded_openblas_runs_kernels_for_this_cpu_unless_the_user_chose():
    from models.blas import cpu_flags, openblas_core_for

    if not any(os.path.exists(p) for p in _CANDIDATES):
        pytest.skip("no system OpenBLAS here")
    expected = openblas_core_for(cpu_flags())
    if expected is None:
        pytest.skip("a CPU without AVX2: OpenBLAS's own detection decides")
    assert _core() == expected  # not OpenBLAS's fallback for a CPU model it does not know
    assert _core(OPENBLAS_CORETYPE="Haswell") == "Haswell"
