"""Give MLX's CPU backend a fast BLAS, before `mlx.core` is first imported.

The Linux `mlx[cpu]` wheel links the reference (netlib) BLAS it bundles: a float32 matmul runs at
a few GFLOP/s. Its `libmlx.so` takes `cblas_sgemm` (and the LAPACK routines) from the process's
global symbol scope first, so a fast CBLAS loaded with RTLD_GLOBAL *before* `mlx.core` is imported
is used instead, 30-100x faster. Loading one afterwards does nothing, which is why
`mlx_model/__init__.py` calls `ensure_fast_blas()` before anything imports MLX.

Search order (the first that exports `cblas_sgemm` wins):
  1. $MLX_MODEL_BLAS: a library path, or `none` to skip all of this.
  2. Intel oneMKL's `libmkl_rt.so.*` from the PyPI `mkl` wheel (`pip install -e ".[fast]"`), or a
     conda / Debian MKL.
  3. OpenBLAS: Debian's `libopenblas0-pthread`, other distros' and conda's libopenblas.
NumPy's and SciPy's bundled OpenBLAS do not help: they export only prefixed symbols
(`scipy_cblas_sgemm64_`, `scipy_cblas_sgemm`), so they are not searched.

`ensure_native_codegen()` makes `mx.compile` kernels use AVX2/FMA: see its docstring.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
from collections.abc import Iterator

ENV_BLAS = "MLX_MODEL_BLAS"
ENV_CODEGEN = "MLX_MODEL_NATIVE_CODEGEN"

_blas_done = False
_blas_path: str | None = None
_blas_lib = None  # its ctypes handle, for set_blas_threads
_handles: list = []  # keep the CDLL objects alive for the life of the process

_MKL_THREADING_SEQUENTIAL, _MKL_THREADING_GNU = 1, 3


def _warn(msg: str) -> None:
    print(f"mlx_model: {msg}", file=sys.stderr)


def _fix_command() -> str:
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


def _cpu_flags() -> set:
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
    fl = _cpu_flags()
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


def _load(path: str, *, what: str = "") -> str | None:
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
    except (OSError, AttributeError) as e:
        if what:
            _warn(f"could not load {what} {path}: {e}")
        return None
    finally:
        for k in env_set:  # don't leak into child processes or other libraries
            os.environ.pop(k, None)


def ensure_fast_blas() -> str | None:
    """Load the best CBLAS found before MLX is imported; return its path, or None.

    Idempotent and cheap (a few file checks, one dlopen). Does nothing off Linux (macOS uses
    Accelerate), once `mlx.core` is imported (too late to matter), or with MLX_MODEL_BLAS=none.
    Prints one line to stderr when nothing is found. Threads: MKL uses one per physical core and
    OpenBLAS one per core available to the process; MKL_NUM_THREADS / OPENBLAS_NUM_THREADS /
    OMP_NUM_THREADS set by the user are respected.
    """
    global _blas_done, _blas_path
    if _blas_done:
        return _blas_path
    _blas_done = True
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return None
    forced = os.environ.get(ENV_BLAS, "").strip()
    if forced.lower() in ("none", "0", "off", "reference"):
        return None
    if forced and forced.lower() != "auto":
        _blas_path = _load(os.path.expanduser(forced), what=f"{ENV_BLAS}=")
        if _blas_path is None:
            _warn(
                f"{ENV_BLAS}={forced} is not a loadable CBLAS (no cblas_sgemm); "
                "MLX uses its slow reference BLAS"
            )
        return _blas_path
    seen = set()
    for groups in (_mkl_candidates, _openblas_candidates):
        for path in groups():
            if path in seen:
                continue
            seen.add(path)
            got = _load(path)
            if got:
                _blas_path = got
                return got
    _warn(
        "no fast BLAS found; MLX will use its slow reference BLAS (matmuls ~50x slower). "
        f"Fix: {_fix_command()}"
    )
    return None


def blas_path() -> str | None:
    """The library `ensure_fast_blas` loaded, if any."""
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


# ------------------------------------------------------------------ mx.compile code generation

# What MLX itself passes in its later releases when built for AVX2 (MLX 0.32.4 passes none).
JIT_FLAGS = ("-mavx2", "-mfma", "-mf16c")
# What lets g++ vectorise the kernel loops (see ensure_native_codegen): inline MLX's scalar maths
# (exp, sigmoid, ...) into the loop, and let it evaluate both sides of MLX's branch-free selects
# (only FP exception flags may differ). -ffp-contract=off keeps every a * b + c rounded twice, as
# MLX's own element-wise ops do: with -mfma, g++ would otherwise fuse them into FMAs, and a
# compiled step would no longer give the uncompiled step's numbers. No fast-math, no reassociation.
VECTORIZE_FLAGS = (
    "-fno-trapping-math",
    "-ffp-contract=off",
    "--param",
    "max-inline-insns-single=2000",
    "--param",
    "max-inline-insns-auto=2000",
)
PREAMBLE = "mlx_model_preamble.h"
_PREAMBLE_TEXT = """// Written by mlx_model._blas.ensure_native_codegen; force-included (g++ -include) before
// MLX's kernel source. MLX's own #include of the preamble is then a no-op (#pragma once).
// Hidden visibility keeps the preamble's functions (simd::exp, ...) local to the kernel, so
// they are inlined and vectorised with the kernel's flags instead of being bound at load time
// to libmlx.so's exported scalar copies (one call per element, no FMA).
#pragma GCC visibility push(hidden)
#include "mlx/backend/cpu/compiled_preamble.h"
#pragma GCC visibility pop
"""
CACHE_STAMP = ".mlx_model-codegen"
_codegen_done = False
_codegen_dir: str | None = None

_WRAPPER = """#!/bin/sh
# Written by mlx_model._blas.ensure_native_codegen. MLX JIT-compiles mx.compile kernels with
# `g++ -std=c++17 -O3 -Wall -fPIC -shared ...` found on PATH, into <tmp>/mlx/<version>/cpu/.
# Add {flags} to those commands only; any other g++ call passes through unchanged.
case " $* " in
  *" -fPIC -shared "*/mlx/*/cpu/*) exec {gxx} {flags} "$@" ;;
esac
exec {gxx} "$@"
"""


def _is_wrapper(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return b"mlx_model._blas.ensure_native_codegen" in f.read(200)
    except OSError:
        return False


def _cache_root() -> list:
    roots = []
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    roots.append(os.path.join(xdg, "mlx_model"))
    import tempfile

    roots.append(os.path.join(tempfile.gettempdir(), f"mlx_model-{os.getuid()}"))
    return roots


def _kernel_cache_dirs() -> list:
    """MLX's JIT kernel cache folders: <temp>/mlx/<version>/cpu, with <temp> found the way
    std::filesystem::temp_directory_path finds it (TMPDIR, TMP, TEMP, TEMPDIR, else /tmp)."""
    tmp = "/tmp"
    for var in ("TMPDIR", "TMP", "TEMP", "TEMPDIR"):
        if os.environ.get(var):
            tmp = os.environ[var]
            break
    return sorted(glob.glob(os.path.join(tmp, "mlx", "*", "cpu")))


def _refresh_kernel_cache(key: str) -> None:
    """Drop kernels built with other flags (MLX reuses a cached kernel by name, whatever built
    it), once per flag set: a stamp file in the cache folder records the flags it was cleared for.
    Deleting is safe for a process that has a kernel loaded (the mapping outlives the file)."""
    for d in _kernel_cache_dirs():
        stamp = os.path.join(d, CACHE_STAMP)
        try:
            with open(stamp) as f:
                if f.read().strip() == key:
                    continue
        except OSError:
            pass
        try:
            for f in glob.glob(os.path.join(d, "lib*.so")):
                os.remove(f)
            with open(stamp, "w") as f:
                f.write(key + "\n")
        except OSError:
            pass  # someone else's cache: its kernels still compute the same numbers, only slower


def ensure_native_codegen() -> str | None:
    """Make MLX's CPU `mx.compile` kernels fast; return the wrapper folder, or None.

    MLX 0.32.4 compiles fused elementwise kernels with a plain `g++ -O3`: baseline x86-64 (SSE2,
    no FMA), and every exp/sigmoid in the loop is a call, per element, to libmlx.so's exported
    scalar `simd::exp<float, 1>` (the kernel's own inline copy is interposed by the one libmlx.so
    exports), which calls libm's `fmaf` six times. So no kernel with a transcendental vectorises.
    MLX takes `g++` from PATH and has no setting for flags, so on Linux x86_64 with AVX2+FMA+F16C
    this puts a `g++` script first on PATH that, for MLX's kernel builds only (everything else
    passes through):
    - adds -mavx2 -mfma -mf16c (what newer MLX releases pass themselves; not -march=native, so a
      cached kernel still runs on any AVX2 machine sharing the cache);
    - force-includes MLX's kernel preamble with hidden visibility, so its maths stays local and
      inlinable, plus VECTORIZE_FLAGS: the loops then vectorise 8-wide. A compiled exp over
      2M floats: ~50 ms -> ~3 ms; silu(x) * y: ~60 ms -> ~4.5 ms. Same results: identical
      operations, no fast-math.
    Kernels cached under <tmp>/mlx/<version>/cpu/ by other flags are deleted once (a stamp file
    records the flags), so they are rebuilt with these. MLX_MODEL_NATIVE_CODEGEN=0 turns all this
    off. Idempotent and cheap.
    """
    global _codegen_done, _codegen_dir
    if _codegen_done:
        return _codegen_dir
    _codegen_done = True
    if os.environ.get(ENV_CODEGEN, "1").strip().lower() in ("0", "no", "off", "false", "none"):
        path = os.environ.get("PATH", "")
        if "jit-cxx-" in path:  # a parent process put the wrapper on PATH: take it off again
            keep = [d for d in path.split(os.pathsep) if not _is_wrapper(os.path.join(d, "g++"))]
            os.environ["PATH"] = os.pathsep.join(keep)
        return None
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return None
    if not {"avx2", "fma", "f16c"} <= _cpu_flags():
        return None
    import hashlib
    import shlex
    import shutil

    path = os.environ.get("PATH", os.defpath)
    first = shutil.which("g++", path=path)
    if first and _is_wrapper(first):
        _codegen_dir = os.path.dirname(first)  # already first on PATH (inherited from a parent)
        return _codegen_dir
    # The real compiler: skip any older wrapper of ours further down PATH (it would call itself).
    dirs = [d for d in path.split(os.pathsep) if not _is_wrapper(os.path.join(d, "g++"))]
    gxx = shutil.which("g++", path=os.pathsep.join(dirs))
    if not gxx:
        return None  # no compiler: MLX runs mx.compile graphs uncompiled anyway
    key = hashlib.sha1(
        (gxx + repr(JIT_FLAGS + VECTORIZE_FLAGS) + _PREAMBLE_TEXT).encode()
    ).hexdigest()[:12]
    for root in _cache_root():
        d = os.path.join(root, f"jit-cxx-{key}")
        flags = JIT_FLAGS + VECTORIZE_FLAGS + ("-include", os.path.join(d, PREAMBLE))
        files = {
            PREAMBLE: _PREAMBLE_TEXT,
            "g++": _WRAPPER.format(gxx=shlex.quote(gxx), flags=" ".join(map(shlex.quote, flags))),
        }
        try:
            for name, text in files.items():  # the preamble first: the script refers to it
                target = os.path.join(d, name)
                try:
                    with open(target) as f:
                        ok = f.read() == text and (name != "g++" or os.access(target, os.X_OK))
                except OSError:
                    ok = False
                if not ok:
                    os.makedirs(d, exist_ok=True)
                    tmp = f"{target}.{os.getpid()}.tmp"
                    with open(tmp, "w") as f:
                        f.write(text)
                    os.chmod(tmp, 0o755 if name == "g++" else 0o644)
                    os.replace(tmp, target)
        except OSError:
            continue
        os.environ["PATH"] = d + os.pathsep + path
        _refresh_kernel_cache(key)
        _codegen_dir = d
        return d
    return None
