"""Load an optimized BLAS before MLX on Linux CPU.

MLX's Linux CPU wheel resolves `cblas_sgemm` from a bundled reference BLAS (about 6 GFLOP/s on two cores).
A BLAS opened with RTLD_GLOBAL before `libmlx.so` is loaded takes precedence, so float32 matmuls run at
what OpenBLAS or MKL give (about 200-335 GFLOP/s on two cores). This module imports nothing of MLX and
must run before the first `import mlx`; `models/__init__.py` calls it first thing.

Set `QLORA_BLAS=off` to keep MLX's own BLAS, or `QLORA_BLAS=/path/to/libopenblas.so` to choose a library.

OpenBLAS picks its kernels from the CPU model when it is loaded, and a release older than the CPU does not know
the model: it falls back to its oldest x86-64 kernels (SSE3, "Prescott"), several times slower than what the CPU
can run (BENCHMARKS.md, "CPU BLAS kernels"). So unless `OPENBLAS_CORETYPE` is set, it is set from the instruction
set the CPU reports before OpenBLAS is opened: the AVX-512 kernels ("SkylakeX") where AVX-512 F/CD/BW/DQ/VL are
present, the AVX2 kernels ("Haswell") where AVX2 and FMA are, nothing otherwise: the kernels for the
instruction set the CPU has, which for the Intel CPUs OpenBLAS knows is what its own detection picks. A user's
`OPENBLAS_CORETYPE` is left as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import sys
import sysconfig

_CANDIDATES = (
    # Debian/Ubuntu: libopenblas0-pthread (or -openmp) registers this alternative.
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
)

loaded_blas: str | None = None

# OpenBLAS kernel families by the CPU flags (as /proc/cpuinfo names them) they need, best first.
_OPENBLAS_CORES = (
    ("SkylakeX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}),
    ("Haswell", {"avx2", "fma"}),
)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags of the first CPU in `cpuinfo` (Linux); empty when it cannot be read."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as file:
            for line in file:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def openblas_core_for(flags: set[str]) -> str | None:
    """The OpenBLAS kernel family (`OPENBLAS_CORETYPE`) for a CPU with `flags`; None: leave it to OpenBLAS."""
    for core, needed in _OPENBLAS_CORES:
        if needed <= flags:
            return core
    return None


def _pypi_mkl() -> list[str]:
    """MKL's single dynamic library, as the `mkl` wheel from PyPI installs it."""
    prefixes = {sys.prefix, sysconfig.get_paths()["data"]}
    return sorted(p for prefix in prefixes for p in glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))


def load_fast_blas() -> str | None:
    """Open the first optimized BLAS found with RTLD_GLOBAL; return its path, or None.

    Does nothing off Linux (macOS uses Accelerate), when MLX is already imported, or when
    `QLORA_BLAS=off`. Safe to call more than once.
    """
    global loaded_blas
    choice = os.environ.get("QLORA_BLAS", "auto")
    if loaded_blas or choice == "off" or not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return loaded_blas
    candidates = [choice] if choice != "auto" else [*_CANDIDATES, *_pypi_mkl()]
    if "OPENBLAS_CORETYPE" not in os.environ:  # read by OpenBLAS when it is opened; MKL ignores it
        core = openblas_core_for(cpu_flags())
        if core:
            os.environ["OPENBLAS_CORETYPE"] = core
    for path in candidates:
        if not os.path.exists(path):
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded_blas = path
        return path
    return None


# Thread-count entry points: (setter, getter) of each library `load_fast_blas` can load.
_THREAD_FUNCTIONS = (
    ("openblas_set_num_threads", "openblas_get_num_threads"),  # OpenBLAS
    ("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),  # MKL's single dynamic library
)


def _thread_functions():
    if loaded_blas is None:
        return None
    library = ctypes.CDLL(loaded_blas)  # already open: the same handle
    for setter, getter in _THREAD_FUNCTIONS:
        if hasattr(library, setter) and hasattr(library, getter):
            return getattr(library, setter), getattr(library, getter)
    return None


def openblas_core() -> str | None:
    """The kernel family the loaded OpenBLAS runs (e.g. "SkylakeX"); None when no OpenBLAS was loaded."""
    if loaded_blas is None:
        return None
    library = ctypes.CDLL(loaded_blas)
    if not hasattr(library, "openblas_get_corename"):
        return None
    library.openblas_get_corename.restype = ctypes.c_char_p
    return library.openblas_get_corename().decode()


def blas_threads() -> int | None:
    """How many threads the loaded BLAS uses for one call; None when no BLAS of known kind was loaded."""
    functions = _thread_functions()
    return int(functions[1]()) if functions else None


def set_blas_threads(n: int) -> bool:
    """Make each call of the loaded BLAS use `n` threads; False (and nothing changed) when that cannot be set.

    Applies to calls that start after it; call it only while no matmul runs (e.g. after `mx.synchronize()`).
    """
    functions = _thread_functions()
    if functions is None:
        return False
    functions[0](int(n))
    return True


@contextlib.contextmanager
def blas_threads_within(n: int):
    """Within this block each call of the loaded BLAS uses `n` threads, then as many as before (for work that runs
    on one MLX stream while the CPU streams' plan gave each stream a share of the cores); nothing changes where
    the BLAS's threads cannot be set. MLX is synchronized on entry and exit, so that no matmul runs meanwhile."""
    before = blas_threads()
    if before is None or before == n:
        yield
        return
    import mlx.core as mx  # (only here: this module must not import MLX before the BLAS is loaded)

    mx.synchronize()
    set_blas_threads(n)
    try:
        yield
    finally:
        mx.synchronize()
        set_blas_threads(before)
