"""Vectorised `mx.compile` kernels on Linux x86_64, built in a private per-user cache.

Why. MLX 0.32.4 compiles fused element-wise kernels with a plain `g++ -O3`: baseline x86-64 (SSE2,
no FMA), and every exp/sigmoid in the loop is a call, per element, to libmlx.so's exported scalar
`simd::exp<float, 1>` (the kernel's own inline copy is interposed by the one libmlx.so exports),
which calls libm's `fmaf` six times. So no kernel with a transcendental vectorises. MLX runs the
`g++` it finds on PATH (`popen`, mlx/backend/cpu/jit_compiler.cpp) and has no setting for flags,
so `install()` puts a `g++` script first on PATH that, for our kernel builds only:
- adds -mavx2 -mfma -mf16c (what newer MLX releases pass themselves; not -march=native, so a
  cached kernel still runs on any AVX2 machine);
- force-includes MLX's kernel preamble with hidden visibility, so its maths stays local and
  inlinable, plus VECTORIZE_FLAGS: the loops then vectorise 8-wide. A compiled exp over 2M
  floats: ~50 ms -> ~3 ms; silu(x) * y: ~60 ms -> ~4.5 ms. Same results: identical operations,
  no fast-math.

Where kernels go. MLX writes each kernel to `std::filesystem::temp_directory_path() / "mlx" /
<version> / "cpu"` (mlx/backend/cpu/compiled.cpp): $TMPDIR (then TMP, TEMP, TEMPDIR, else /tmp),
read at every compile. It reuses a cached library by kernel name, whatever flags built it, so
kernels built with our flags must never land in the shared `/tmp/mlx/...` folder other MLX
programs use. `install()` therefore gives MLX a TMPDIR of its own, `<cache>/<key>/tmp`, where
<key> hashes the compiler, the flags and the preamble (a new flag set gets a new folder, so
nothing is ever deleted), and the wrapper adds flags only to builds whose output lies in that
folder: any other g++ call, e.g. from a child process with another TMPDIR, passes through.

PATH and TMPDIR are set in the process's C environment only (`os.putenv`), which is what MLX's C++
reads: `os.environ` is unchanged, so Python's `tempfile`, `shutil.which` and children started with
`env=os.environ` see the original values. Children started without `env=` inherit the C
environment (and so compile into the same private folder).

The cache: $MLX_MODEL_KERNEL_CACHE, else $XDG_CACHE_HOME/mlx_deepseek/kernels, else
~/.cache/mlx_deepseek/kernels. Every folder of it is created 0700 and checked: a real directory
(no symlink), owned by this user, no group/other permissions, in a parent others cannot write
(sticky /tmp is fine); otherwise `UnsafeCacheError`, and nothing is written.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import stat
import sys

from ._blas import cpu_flags

ENV_CODEGEN = "MLX_MODEL_NATIVE_CODEGEN"
ENV_CACHE = "MLX_MODEL_KERNEL_CACHE"
OFF = ("0", "no", "off", "false", "none")

# What MLX itself passes in its later releases when built for AVX2 (MLX 0.32.4 passes none).
JIT_FLAGS = ("-mavx2", "-mfma", "-mf16c")
# What lets g++ vectorise the kernel loops: inline MLX's scalar maths (exp, sigmoid, ...) into the
# loop, and let it evaluate both sides of MLX's branch-free selects (only FP exception flags may
# differ). -ffp-contract=off keeps every a * b + c rounded twice, as MLX's own element-wise ops do:
# with -mfma, g++ would otherwise fuse them into FMAs, and a compiled step would no longer give
# the uncompiled step's numbers. No fast-math, no reassociation.
VECTORIZE_FLAGS = (
    "-fno-trapping-math",
    "-ffp-contract=off",
    "--param",
    "max-inline-insns-single=2000",
    "--param",
    "max-inline-insns-auto=2000",
)
PREAMBLE = "mlx_model_preamble.h"
_PREAMBLE_TEXT = """// Written by mlx_model._jit; force-included (g++ -include) before MLX's kernel source.
// MLX's own #include of the preamble is then a no-op (#pragma once).
// Hidden visibility keeps the preamble's functions (simd::exp, ...) local to the kernel, so
// they are inlined and vectorised with the kernel's flags instead of being bound at load time
// to libmlx.so's exported scalar copies (one call per element, no FMA).
#pragma GCC visibility push(hidden)
#include "mlx/backend/cpu/compiled_preamble.h"
#pragma GCC visibility pop
"""
_MARK = b"# Written by mlx_model."  # every wrapper of ours, this one and older ones
_WRAPPER = """#!/bin/sh
# Written by mlx_model._jit. MLX JIT-compiles mx.compile kernels with
# `g++ -std=c++17 -O3 -Wall -fPIC -shared SRC -o LIB` found on PATH, into $TMPDIR/mlx/<ver>/cpu.
# Add our flags only when LIB lies in our private kernel folder; other calls pass through.
case " $* " in
  *" -fPIC -shared "*" -o "{tmp}/mlx/*/cpu/*) exec {gxx} {flags} "$@" ;;
esac
exec {gxx} "$@"
"""


class UnsafeCacheError(RuntimeError):
    """The kernel cache folder is not private to this user (message: problem and fix)."""


def is_wrapper(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return _MARK in f.read(200)
    except OSError:
        return False


def cache_root() -> str:
    if os.environ.get(ENV_CACHE):
        return os.path.abspath(os.path.expanduser(os.environ[ENV_CACHE]))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "mlx_deepseek", "kernels")


def private_dir(path: str) -> None:
    """Create `path` 0700 if missing; raise UnsafeCacheError unless only this user can use it."""
    fix = f"remove it or set {ENV_CACHE} to a folder of your own"
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    pst = os.stat(parent)
    if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
        raise UnsafeCacheError(
            f"kernel cache parent {parent} is writable by other users "
            f"(mode {stat.S_IMODE(pst.st_mode):o}): chmod go-w {parent} or set {ENV_CACHE}"
        )
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeCacheError(f"kernel cache {path} is not a directory (a link or file): {fix}")
    if st.st_uid != os.getuid():
        raise UnsafeCacheError(
            f"kernel cache {path} belongs to uid {st.st_uid}, not to you ({os.getuid()}): {fix}"
        )
    if st.st_mode & 0o077:
        raise UnsafeCacheError(
            f"kernel cache {path} has mode {stat.S_IMODE(st.st_mode):o}, open to other users: "
            f"chmod 700 {path}, or {fix}"
        )


def _write(path: str, text: str, mode: int) -> None:
    """Write `path` atomically unless it already holds `text` (in a folder only we can write)."""
    try:
        with open(path) as f:
            if f.read() == text and stat.S_IMODE(os.stat(path).st_mode) == mode:
                return
    except OSError:
        pass
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)  # umask may have cut it
    os.replace(tmp, path)


def _path_without_wrappers(path: str) -> str:
    return os.pathsep.join(
        d for d in path.split(os.pathsep) if not is_wrapper(os.path.join(d, "g++"))
    )


def _unavailable(gxx: str | None) -> str:
    """Why the wrapper cannot or should not be used here, or ""."""
    if os.environ.get(ENV_CODEGEN, "1").strip().lower() in OFF:
        return f"opted out ({ENV_CODEGEN}={os.environ[ENV_CODEGEN]})"
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return "not Linux x86_64"
    if not {"avx2", "fma", "f16c"} <= cpu_flags():
        return "CPU without AVX2/FMA/F16C"
    if not gxx:
        return "no g++ on PATH (MLX then runs compiled graphs uncompiled)"
    return ""


def install() -> tuple[str | None, str]:
    """Make MLX's CPU `mx.compile` kernels fast; return (the private folder, "") or (None, why).

    Call before MLX compiles anything (`mlx_model.speedups.enable()` does). Raises
    UnsafeCacheError when the cache folder is not private. $MLX_MODEL_NATIVE_CODEGEN=0 turns this
    off (and takes a wrapper and TMPDIR inherited from a parent process off again).
    """
    path = os.environ.get("PATH", os.defpath)
    clean = _path_without_wrappers(path)
    gxx = shutil.which("g++", path=clean)
    why = _unavailable(gxx)
    if why:  # undo what a parent process of ours may have passed down in the environment
        if clean != path:
            os.putenv("PATH", clean)
        tmpdir = os.environ.get("TMPDIR", "")
        if tmpdir and os.path.abspath(tmpdir).startswith(cache_root() + os.sep):
            os.unsetenv("TMPDIR")  # else plain kernels would land in our flags' folder
        return None, why
    key = hashlib.sha1(
        (gxx + repr(JIT_FLAGS + VECTORIZE_FLAGS) + _PREAMBLE_TEXT + _WRAPPER).encode()
    ).hexdigest()[:12]
    root = cache_root()
    folder = os.path.join(root, f"jit-{key}")
    tmp = os.path.join(folder, "tmp")
    for d in (root, folder, tmp):
        private_dir(d)
    flags = JIT_FLAGS + VECTORIZE_FLAGS + ("-include", os.path.join(folder, PREAMBLE))
    _write(os.path.join(folder, PREAMBLE), _PREAMBLE_TEXT, 0o600)  # first: the script uses it
    script = _WRAPPER.format(
        tmp=shlex.quote(tmp), gxx=shlex.quote(gxx), flags=" ".join(map(shlex.quote, flags))
    )
    _write(os.path.join(folder, "g++"), script, 0o700)
    os.putenv("PATH", folder + os.pathsep + clean)
    os.putenv("TMPDIR", tmp)
    return folder, ""
