"""The one explicit set-up that makes MLX fast on a Linux CPU: call `enable()` before `mlx.core`.

    from mlx_model import speedups
    speedups.enable()          # before the first `import mlx.core` anywhere in the process
    import mlx.core as mx
    print(speedups.status())   # which BLAS MLX uses, where compiled kernels go, and any fix

Importing `mlx_model` (or `torch_reference`) does none of this: no environment variable, no file,
no library. The CLIs (`python -m mlx_model.train`, `.generate`, `.evaluate`, `python -m
tools.bench`) call `enable_for_cli()` first thing when run as programs. On Linux `enable()`:
1. loads a fast CBLAS (MKL or OpenBLAS) globally, which MLX's CPU backend then uses instead of its
   bundled reference BLAS (`_blas.py`; $MLX_MODEL_BLAS=none opts out);
2. on x86_64 with AVX2/FMA, makes `mx.compile` kernels vectorise, built into a private per-user
   kernel cache, never MLX's shared `/tmp/mlx` one (`_jit.py`; $MLX_MODEL_NATIVE_CODEGEN=0 opts
   out, $MLX_MODEL_KERNEL_CACHE moves the cache);
3. asks MLX for breadth-first graph order (MLX_BFS_MAX_WIDTH=1000 unless set), which the trainer's
   CPU lanes need (mlx_model/trainer.py): depth first, MLX's cap on queued tasks makes the second
   lane wait for the first. MLX reads it once, at its first evaluation. `--grad-checkpoint`
   asks for depth first instead (`depth_first_order`): memory before lane overlap.
Environment changes (2, 3) go to the process's C environment only (`os.putenv`: what MLX reads);
`os.environ` stays as it was. Elsewhere (macOS: Accelerate and Metal) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

from . import _blas, _jit
from ._jit import UnsafeCacheError

__all__ = [
    "Status",
    "UnsafeCacheError",
    "depth_first_order",
    "enable",
    "enable_for_cli",
    "reapply",
    "status",
]

BFS_WIDTH = "1000"
_status: Status | None = None  # what enable() did; None until it ran
_C_KEYS = ("PATH", "TMPDIR", "MLX_BFS_MAX_WIDTH")  # what enable() may set in the C environment
_c_env: dict[str, str] = {}  # those of them enable() set, with their values (for reapply)


@dataclass(frozen=True)
class Status:
    """Where MLX's speed comes from in this process."""

    blas: str | None  # the fast CBLAS MLX uses, or None: its slow reference BLAS
    blas_note: str  # why not, when blas is None ("" otherwise or off Linux)
    kernels: str | None  # private folder of vectorised mx.compile kernels, or None
    kernels_note: str  # why not, when kernels is None
    enabled: bool  # enable() ran in this process

    @property
    def slow_blas(self) -> bool:
        """True when MLX runs matmuls on its reference BLAS (Linux only)."""
        return sys.platform.startswith("linux") and self.blas is None

    @property
    def fix(self) -> str:
        """One line: how to get the fast BLAS, or "" when nothing is wrong."""
        if not self.slow_blas:
            return ""
        if "imported" in self.blas_note or not self.enabled:
            return "call mlx_model.speedups.enable() before the first `import mlx.core`"
        if self.blas_note.startswith("opted out"):
            return f"unset {_blas.ENV_BLAS}"
        if _blas.ENV_BLAS in self.blas_note:
            return f"point {_blas.ENV_BLAS} at libmkl_rt.so or libopenblas.so.0, or unset it"
        return _blas.fix_command()

    def __str__(self) -> str:
        blas = self.blas or f"MLX's slow reference BLAS ({self.blas_note})"
        kernels = self.kernels or f"MLX's defaults ({self.kernels_note})"
        line = f"BLAS: {blas}; mx.compile kernels: {kernels}"
        return line + (f"; fix: {self.fix}" if self.fix else "")


def _global_cblas() -> str | None:
    """The library that provides `cblas_sgemm` in the global symbol scope, if any (a CBLAS
    preloaded with LD_PRELOAD, or loaded by enable()); MLX's own stays local to libmlx.so.
    Caveat: one loaded globally only after `mlx.core` would show here although MLX bound its
    bundled BLAS at import (Python loads extensions with RTLD_NOW)."""

    class _DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p)]
        _fields_ += [("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

    try:
        process = ctypes.CDLL(None)
        addr = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p)
        info = _DlInfo()
        if process.dladdr(addr, ctypes.byref(info)) and info.fname:
            return os.fsdecode(info.fname)
    except (AttributeError, OSError):
        pass
    return None


def status() -> Status:
    """What MLX uses in this process; `print(status())` says it in one line, with the fix."""
    if _status is not None:
        return _status
    linux = sys.platform.startswith("linux")
    preloaded = _global_cblas() if linux else None
    if not linux:
        note = ""
    elif "mlx.core" in sys.modules:
        note = "mlx.core was imported without mlx_model.speedups.enable()"
    else:
        note = "mlx_model.speedups.enable() not called yet"
    return Status(preloaded, "" if preloaded else note, None, "enable() not called", False)


def enable(*, quiet: bool = False) -> Status:
    """Set up the fast BLAS, vectorised kernels and graph order; return `status()`.

    Call it before the first `import mlx.core` in the process: once MLX is imported its BLAS is
    fixed. Idempotent. Prints one line to stderr when MLX will use its slow reference BLAS on Linux
    (mlx.core imported first, no MKL/OpenBLAS found, opted out), unless `quiet`. Raises
    UnsafeCacheError when the kernel cache folder is not private to this user.
    """
    global _status
    if _status is not None:
        return _status
    if not sys.platform.startswith("linux"):
        _status = Status(None, "", None, "not Linux", True)
        return _status
    if "mlx.core" in sys.modules:  # too late for the BLAS; the kernels can still be ours
        preloaded = _global_cblas()
        blas, blas_note = preloaded, "" if preloaded else "mlx.core was imported before enable()"
    else:
        blas, blas_note = _blas.load_fast_blas()
    if "MLX_BFS_MAX_WIDTH" not in os.environ:
        os.putenv("MLX_BFS_MAX_WIDTH", BFS_WIDTH)
    try:
        kernels, kernels_note = _jit.install()
    except UnsafeCacheError:
        raise
    except OSError as e:  # e.g. a read-only home: MLX's own kernels then, in its own cache
        kernels, kernels_note = None, f"cannot prepare the kernel cache: {e}; set {_jit.ENV_CACHE}"
    _status = Status(blas, blas_note, kernels, kernels_note, True)
    _c_env.update(_changed_c_env())
    if _status.slow_blas and not quiet:
        print(
            f"mlx_model: MLX uses its slow reference BLAS ({blas_note}; matmuls ~30x slower). "
            f"Fix: {_status.fix}",
            file=sys.stderr,
        )
    return _status


def _changed_c_env() -> dict[str, str]:
    """The keys of _C_KEYS whose C-environment value differs from os.environ's."""
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    out = {}
    for k in _C_KEYS:
        v = libc.getenv(k.encode())
        if v is not None and os.fsdecode(v) != os.environ.get(k):
            out[k] = os.fsdecode(v)
    return out


def reapply() -> None:
    """Put back what `enable()` set in the C environment (a no-op before it ran).

    Code that restores `os.environ` wholesale, like `unittest.mock.patch.dict(os.environ)` (which
    the `datasets` library runs around its downloads), re-exports every variable from
    `os.environ` and so drops our PATH and TMPDIR: MLX would then build plain kernels into its
    shared cache. Call this after such code; the data path does it after each use of `datasets`.
    """
    for k, v in _c_env.items():
        os.putenv(k, v)


def depth_first_order() -> None:
    """Ask MLX for depth-first graph order (MLX_BFS_MAX_WIDTH=1), unless the variable is set in
    `os.environ`: what --grad-checkpoint needs to save memory. Breadth first, one evaluation of
    a step runs the same stage of many blocks' backward passes together, so their recomputed
    activations are alive at once (small, batch 32, checkpointed: peak 542 MB at width 1000,
    391 MB at width 1; 900 MB without checkpointing; issue 14). CPU lanes then take turns
    instead of overlapping. Like `enable()`'s, it acts only before the process's first
    evaluation (MLX reads the variable once); any platform."""
    if "MLX_BFS_MAX_WIDTH" in os.environ:
        return
    os.putenv("MLX_BFS_MAX_WIDTH", "1")
    if "MLX_BFS_MAX_WIDTH" in _c_env:
        _c_env["MLX_BFS_MAX_WIDTH"] = "1"


def enable_for_cli() -> Status:
    """`enable()` for a program's entry point: an unsafe kernel cache is one `error:` line on
    stderr and exit status 2."""
    try:
        return enable()
    except UnsafeCacheError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
