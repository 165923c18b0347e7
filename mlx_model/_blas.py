"""Find and load a fast CBLAS for MLX's CPU backend (Linux); `mlx_model.speedups` calls it.

The Linux `mlx[cpu]` wheel links the reference (netlib) BLAS it bundles: a float32 matmul runs at
a few GFLOP/s. Its `libmlx.so` takes `cblas_sgemm` (and the LAPACK routines) from the process's
global symbol scope first, so a fast CBLAS loaded with RTLD_GLOBAL *before* `mlx.core` is imported
is used instead, 30-100x faster. Loading one afterwards does nothing (Python loads extensions with
RTLD_NOW, so libmlx.so's symbols are bound at import), which is why
`mlx_model.speedups.enable()` must run before the first `import mlx.core`. Nothing here runs at
import time.

Search order (the first that exports `cblas_sgemm` wins):
  1. $MLX_MODEL_BLAS: a library path, or `none` to skip all of this.
  2. Intel oneMKL's `libmkl_rt.so.*` from the PyPI `mkl` wheel (`pip install -e ".[fast]"`), or a
     conda / Debian MKL.
  3. OpenBLAS: Debian's `libopenblas0-pthread`, other distros' and conda's libopenblas.
NumPy's and SciPy's bundled OpenBLAS do not help: they export only prefixed symbols
(`scipy_cblas_sgemm64_`, `scipy_cblas_sgemm`), so they are not searched.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
from collections.abc import Iterator

ENV_BLAS = "MLX_MODEL_BLAS"

_blas_path: str | None = None
_blas_lib = None  # its ctypes handle, for set_blas_threads
_handles: list = []  # keep the CDLL objects alive for the life of the process

_MKL_THREADING_SEQUENTIAL, _MKL_THREADING_GNU = 1, 3


def fix_command() -> str:
    if platform.machine().lower() in ("x86_64", "amd64"):
        return (
            'pip install "mkl==2026.2.0"  (what `pip install -e ".[fast]"` installs; '
            "or: apt-get install libopenblas0-pthread)"
        )
    return "apt-get install libopenblas0-pthread"


def _multiarch() -> str:
    import sysconfig

    return sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"


def _mkl_candidates() -> Iterator[str]:
    """libmkl_rt from the `mkl` wheel (it installs into <prefix>/lib), conda, or Debian."""
    prefixes = [sys.prefix]
    if sys.base_prefix != sys.prefix:
        prefixes.append(sys.base_prefix)
    found = False
    for p in prefixes:
        for f in sorted(glob.glob(os.path.join(p, "lib", "libmkl_rt.so*")), reverse=True):
            found = True
            yield f
    if not found:  # e.g. `pip install --user mkl` or --target: ask the distribution where it went
        try:
            from importlib import metadata

            dist = metadata.distribution("mkl")
            for f in sorted(
                (f for f in dist.files or () if "libmkl_rt.so" in f.name),
                key=lambda f: f.name,
                reverse=True,
            ):
                yield os.path.normpath(str(dist.locate_file(f)))
        except Exception:
            pass
    ma = _multiarch()
    yield f"/usr/lib/{ma}/libmkl_rt.so"  # Debian/Ubuntu intel-mkl


def _openblas_candidates() -> Iterator[str]:
    ma = _multiarch()
    yield f"/usr/lib/{ma}/openblas-pthread/libopenblas.so.0"  # Debian libopenblas0-pthread
    yield f"/usr/lib/{ma}/openblas-openmp/libopenblas.so.0"  # Debian libopenblas0-openmp
    yield f"/usr/lib/{ma}/libopenblas.so.0"  # Debian alternatives link
    yield os.path.join(sys.prefix, "lib", "libopenblas.so.0")  # conda
    yield os.path.join(sys.prefix, "lib", "libopenblas.so")
    yield "/usr/lib64/libopenblas.so.0"  # Fedora / RHEL
    yield "/usr/lib64/libopenblasp.so.0"
    yield "/usr/lib/libopenblas.so.0"  # Arch
    yield f"/usr/lib/{ma}/openblas-serial/libopenblas.so.0"  # single-threaded, still fast
    import ctypes.util  # last: it may run ldconfig

    name = ctypes.util.find_library("openblas")
    if name:
        yield name


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _openblas_coretype() -> str | None:
    """An OPENBLAS_CORETYPE for this CPU, for when the user set none.

    OpenBLAS picks its kernels by CPU model when it is loaded; a version older than the CPU (Debian
    12 ships 0.3.21) does not know the model and falls back to its generic SSE3 kernels
    ("Prescott"), ~10x slower. The instruction set decides the sgemm kernel, so name the core
    by the CPU's flags (newer cores that OpenBLAS knows use these same float32 kernels).
    """
    if platform.machine() != "x86_64":
        return None
    fl = cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= fl:
        return "SkylakeX"
    if {"avx2", "fma"} <= fl:
        return "Haswell"
    return None


def _find_iomp(mkl_dir: str) -> str | None:
    """Intel's OpenMP runtime, which MKL's default threading layer needs (`intel-openmp` wheel)."""
    p = os.path.join(mkl_dir, "libiomp5.so")
    if os.path.exists(p):
        return p
    try:
        from importlib import metadata

        dist = metadata.distribution("intel-openmp")
        for f in dist.files or ():
            if f.name == "libiomp5.so":
                return os.path.normpath(str(dist.locate_file(f)))
    except Exception:
        pass
    return None


def _load(path: str) -> str | None:
    """Load `path` globally if it exports cblas_sgemm; return the path or None."""
    import ctypes

    if os.sep in path and not os.path.exists(path):
        return None
    is_mkl = os.path.basename(path).startswith("libmkl_rt")
    is_openblas = "openblas" in os.path.basename(path)
    env_set = {}
    if is_openblas and "OPENBLAS_CORETYPE" not in os.environ:
        core = _openblas_coretype()
        if core:
            env_set["OPENBLAS_CORETYPE"] = core  # read once, when the library is loaded
    for k, v in env_set.items():
        os.environ[k] = v
    try:
        # Load locally first, so a library without the symbol never enters the global scope.
        lib = ctypes.CDLL(path, mode=os.RTLD_LOCAL)
        if not hasattr(lib, "cblas_sgemm"):
            return None
        if is_mkl:
            # MKL's default (Intel) threading layer dlopens libiomp5 from its own folder and
            # kills the process at the first matmul if it is missing: load it, or switch layer.
            mkl_dir = os.path.dirname(os.path.realpath(path)) if os.sep in path else ""
            if "MKL_THREADING_LAYER" not in os.environ:
                iomp = _find_iomp(mkl_dir) if mkl_dir else None
                if iomp:
                    _handles.append(ctypes.CDLL(iomp, mode=os.RTLD_GLOBAL))
                else:
                    layer = _MKL_THREADING_SEQUENTIAL
                    try:
                        _handles.append(ctypes.CDLL("libgomp.so.1", mode=os.RTLD_GLOBAL))
                        layer = _MKL_THREADING_GNU
                    except OSError:
                        pass
                    lib.MKL_Set_Threading_Layer(ctypes.c_int(layer))
        _handles.append(ctypes.CDLL(path, mode=os.RTLD_GLOBAL))
        _handles.append(lib)
        return path
    except (OSError, AttributeError):
        return None
    finally:
        for k in env_set:  # don't leak into child processes or other libraries
            os.environ.pop(k, None)


OPT_OUT = ("none", "0", "off", "reference")


def load_fast_blas() -> tuple[str | None, str]:
    """Load the best CBLAS found, globally; return (its path, "") or (None, why not).

    The caller checks that this is Linux and that `mlx.core` is not imported yet. Cheap (a few
    file checks, one dlopen); call it once. Threads: MKL uses one per physical core and OpenBLAS
    one per core available to the process; MKL_NUM_THREADS / OPENBLAS_NUM_THREADS /
    OMP_NUM_THREADS set by the user are respected.
    """
    global _blas_path
    forced = os.environ.get(ENV_BLAS, "").strip()
    if forced.lower() in OPT_OUT:
        return None, f"opted out ({ENV_BLAS}={forced})"
    if forced and forced.lower() != "auto":
        _blas_path = _load(os.path.expanduser(forced))
        return _blas_path, "" if _blas_path else f"{ENV_BLAS}={forced} is not a loadable CBLAS"
    seen = set()
    for groups in (_mkl_candidates, _openblas_candidates):
        for path in groups():
            if path in seen:
                continue
            seen.add(path)
            got = _load(path)
            if got:
                _blas_path = got
                return got, ""
    return None, "no MKL or OpenBLAS found"


def blas_path() -> str | None:
    """The library `load_fast_blas` loaded, if any."""
    return _blas_path


def set_blas_threads(n: int) -> int | None:
    """Set the loaded BLAS's thread count (MKL or OpenBLAS); return the previous one, or None
    when there is no library of ours to tell (then nothing changes)."""
    global _blas_lib
    import ctypes

    if not _blas_path:
        return None
    if _blas_lib is None:  # the library is loaded already: this only looks it up, once
        _blas_lib = ctypes.CDLL(_blas_path)
    lib = _blas_lib
    if hasattr(lib, "MKL_Get_Max_Threads"):
        prev = lib.MKL_Get_Max_Threads()
        lib.MKL_Set_Num_Threads(ctypes.c_int(n))
        return prev
    if hasattr(lib, "openblas_get_num_threads"):
        prev = lib.openblas_get_num_threads()
        lib.openblas_set_num_threads(ctypes.c_int(n))
        return prev
    return None
