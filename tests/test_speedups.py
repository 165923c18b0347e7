"""Import has no side effects; `mlx_model.speedups.enable()` keeps its kernels private and says
when MLX is slow.

Every check runs in a fresh interpreter with a scratch HOME and TMPDIR (pytest's own process
imported MLX long ago). A fake `g++` first on PATH logs each command line and then runs the real
compiler, so the tests see exactly which builds got our flags.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")
OURS = ("MLX_MODEL_BLAS", "MLX_MODEL_NATIVE_CODEGEN", "MLX_MODEL_KERNEL_CACHE", "XDG_CACHE_HOME")


def scratch_env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OURS and k != "MLX_BFS_MAX_WIDTH"}
    for d in ("home", "tmp"):
        (tmp_path / d).mkdir(exist_ok=True)
    env.update(HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"), **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run(code: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *args] if args else [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def tree(*roots: Path) -> set:
    return {str(p) for r in roots for p in r.rglob("*")}


# Prints os.environ, the C environment MLX reads, and the BLAS/OpenMP libraries mapped.
SNAPSHOT = r"""
import ctypes, json, os
def snap():
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    c = {k: libc.getenv(k.encode()) for k in ("PATH", "TMPDIR", "MLX_BFS_MAX_WIDTH")}
    maps = sorted({l.split()[-1].rsplit("/", 1)[-1] for l in open("/proc/self/maps") if "/" in l})
    libs = [m for m in maps if m.startswith(("libmkl", "libiomp", "libopenblas"))]
    return {"environ": dict(os.environ), "c": {k: v and v.decode() for k, v in c.items()}, "libs": libs}
before = snap()
import {mods}
after = snap()
print(json.dumps({"before": before, "after": after}))
"""


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/maps")
@pytest.mark.parametrize(
    "mods",
    [
        "mlx_model",
        "mlx_model.config",
        "torch_reference",
        "torch_reference.model, torch_reference.loss",
    ],
)
def test_import_has_no_side_effects(tmp_path, mods):
    env = scratch_env(tmp_path)
    files = tree(tmp_path)
    p = run(SNAPSHOT.replace("{mods}", mods), env)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["after"]["environ"] == out["before"]["environ"]
    assert out["after"]["c"] == out["before"]["c"]  # PATH, TMPDIR, MLX_BFS_MAX_WIDTH
    assert out["after"]["libs"] == out["before"]["libs"] == [], out["after"]["libs"]  # no MKL/iomp
    assert tree(tmp_path) == files, "import wrote files"
    assert p.stderr == ""


def test_issue_acceptance_command(tmp_path):
    code = "import os; e=dict(os.environ); import mlx_model, torch_reference; assert dict(os.environ) == e"
    p = run(code, scratch_env(tmp_path))
    assert p.returncode == 0, p.stderr


# ------------------------------------------------------------------------- kernels
COMPILE = r"""
import json, os, tempfile
from mlx_model import speedups
environ = dict(os.environ)
st = speedups.enable()
import mlx.core as mx, mlx.nn as nn, numpy as np
x = mx.array(np.linspace(-4, 4, 1000, dtype=np.float32))
got = np.array(mx.compile(lambda a, b: nn.silu(a) * b)(x, x))
xd = np.asarray(x, np.float64)
ref = xd * xd / (1 + np.exp(-xd))
err = float(np.abs(got - ref).max() / np.abs(ref).max())  # relative, float64 reference
print(json.dumps({"kernels": st.kernels, "err": err, "tempdir": tempfile.gettempdir(),
                  "environ_same": dict(os.environ) == environ}))
"""


def fake_gxx(tmp_path: Path) -> tuple[dict, Path]:
    """A `g++` that logs its arguments (one line per call) and runs the real one."""
    real = shutil.which("g++")
    if not real:
        pytest.skip("no g++")
    bin_dir, log = tmp_path / "bin", tmp_path / "gxx.log"
    bin_dir.mkdir()
    script = bin_dir / "g++"
    script.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {real} "$@"\n')
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, log


def test_kernels_stay_in_a_private_cache(tmp_path):
    path, log = fake_gxx(tmp_path)
    env = scratch_env(tmp_path, **path)
    shared = tmp_path / "tmp" / "mlx" / "0.32.4" / "cpu"  # MLX's shared cache, with a stranger's
    shared.mkdir(parents=True)  # kernel in it that must survive
    (shared / "libstranger.so").write_bytes(b"not ours")
    p = run(COMPILE, env)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["err"] < 1e-6 and out["environ_same"], out
    assert out["tempdir"] == env["TMPDIR"]  # Python's tempfile is not redirected
    assert tree(tmp_path / "tmp") == {str(tmp_path / "tmp" / "mlx")} | {
        str(p) for p in (shared.parent, shared, shared / "libstranger.so")
    }, "MLX's shared kernel cache was touched"
    if out["kernels"] is None:
        pytest.skip("no vectorised kernels on this machine")
    folder = Path(out["kernels"])
    assert folder.parent == tmp_path / "home" / ".cache" / "mlx_deepseek" / "kernels"
    for d in (folder.parent, folder, folder / "tmp"):
        st = d.lstat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid(), d
    assert list(folder.glob("tmp/mlx/*/cpu/lib*.so"))
    calls = log.read_text().splitlines()
    builds = [c for c in calls if "-shared" in c]
    assert builds and all("-mavx2" in c and f"-o {folder}/tmp/mlx/" in c for c in builds), calls
    # The wrapper adds nothing to a build outside our folder (e.g. a child with another TMPDIR).
    src = tmp_path / "k.cpp"
    src.write_text('extern "C" int f(int x) { return x + 1; }\n')
    before = len(calls)
    lib = tmp_path / "tmp" / "elsewhere" / "mlx" / "0.32.4" / "cpu" / "libk.so"
    lib.parent.mkdir(parents=True)
    cmd = f"-std=c++17 -O3 -Wall -fPIC -shared {src} -o {lib}".split()
    subprocess.run([str(folder / "g++"), *cmd], check=True, env=env)
    new = log.read_text().splitlines()[before:]
    assert new == [" ".join(cmd)], new


def test_second_run_reuses_the_cache(tmp_path):
    env = scratch_env(tmp_path)
    assert run(COMPILE, env).returncode == 0
    files = tree(tmp_path)
    p = run(COMPILE, env)
    assert p.returncode == 0, p.stderr
    assert tree(tmp_path) == files  # nothing rebuilt, nothing deleted


def _unsafe_mode(root: Path) -> None:
    root.mkdir(parents=True)
    root.chmod(0o755)


def _unsafe_link(root: Path) -> None:
    root.parent.mkdir(parents=True)
    (root.parent / "elsewhere").mkdir(mode=0o700)
    root.symlink_to(root.parent / "elsewhere")


def _unsafe_owner(root: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("changing a folder's owner needs root")
    root.mkdir(parents=True, mode=0o700)
    os.chown(root, 12345, 12345)


def _unsafe_parent(root: Path) -> None:
    root.parent.mkdir(parents=True)
    root.parent.chmod(0o777)  # writable by all, not sticky: the folder could be swapped


@pytest.mark.parametrize("make", [_unsafe_mode, _unsafe_link, _unsafe_owner, _unsafe_parent])
def test_unsafe_cache_is_refused(tmp_path, make):
    root = tmp_path / "cache" / "kernels"
    make(root)
    env = scratch_env(tmp_path, MLX_MODEL_KERNEL_CACHE=str(root))
    files = tree(tmp_path)
    p = run("", env, "-m", "mlx_model.evaluate", "--help")
    codegen = run("from mlx_model import _jit; print(_jit._unavailable('g++'))", env).stdout
    if codegen.strip():
        pytest.skip(f"no vectorised kernels here: {codegen.strip()}")
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: kernel cache"), p.stderr
    assert tree(tmp_path) == files, "something was written into an unsafe cache"


# ------------------------------------------------------------------------- slow BLAS
STATUS = r"""
import json
{first}
from mlx_model import speedups
st = speedups.enable()
print(json.dumps({"slow": st.slow_blas, "fix": st.fix, "str": str(st), "blas": st.blas}))
"""


@pytest.mark.skipif(not LINUX, reason="the reference BLAS is a Linux wheel matter")
def test_mlx_imported_first_is_reported(tmp_path):
    env = scratch_env(tmp_path)
    before = run("import mlx.core\nfrom mlx_model import speedups\nprint(speedups.status())", env)
    assert "mlx.core was imported without" in before.stdout, before.stdout + before.stderr
    p = run(STATUS.replace("{first}", "import mlx.core"), env)
    out = json.loads(p.stdout)
    assert out["slow"] and out["blas"] is None, out
    assert "enable() before the first `import mlx.core`" in out["fix"]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "slow reference BLAS" in lines[0] and out["fix"] in lines[0], lines


@pytest.mark.skipif(not LINUX, reason="the reference BLAS is a Linux wheel matter")
@pytest.mark.parametrize(
    "blas, fix",
    [("none", "unset MLX_MODEL_BLAS"), ("/no/such/libblas.so", "point MLX_MODEL_BLAS at")],
)
def test_cli_says_how_to_fix_slow_blas(tmp_path, blas, fix):
    env = scratch_env(tmp_path, MLX_MODEL_BLAS=blas)
    p = run("", env, "-m", "mlx_model.evaluate", "--help")
    assert p.returncode == 0, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "slow reference BLAS" in lines[0] and fix in lines[0], lines


def test_fast_blas_is_quiet(tmp_path):
    p = run(STATUS.replace("{first}", ""), scratch_env(tmp_path))
    out = json.loads(p.stdout)
    if out["slow"]:
        pytest.skip("no fast BLAS installed here")
    assert p.stderr == "" and out["fix"] == "", p.stderr


def test_train_cli_leaves_mlx_shared_cache_alone(tmp_path):
    """A real (tiny, 2-step) training run through the CLI compiles its kernels in our private
    cache: MLX's shared one under TMPDIR is never created. The cache is the user's usual one
    (warm, as for this test session) so the run stays short."""
    from mlx_model import _jit

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefgh"), 4)) for _ in range(50)]
    (tmp_path / "a.txt").write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(400)))
    env = scratch_env(tmp_path, MLX_MODEL_KERNEL_CACHE=_jit.cache_root())
    args = ["--preset", "tiny", "--max-steps", "2", "--eval-every", "2", "--progress", "false"]
    args += ["--data", str(tmp_path / "a.txt"), "--cache-dir", str(tmp_path / "data")]
    p = run("", env, "-m", "mlx_model.train", *args, "--out", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert not (tmp_path / "tmp" / "mlx").exists(), "MLX's shared kernel cache was written"


REAPPLY = r"""
import ctypes, json, os, unittest.mock
from pathlib import Path

import datasets

d = os.environ["DS_DIR"]
datasets.Dataset.from_dict({"text": ["a b", "c d", "e"]}).save_to_disk(d)
from mlx_model import speedups

speedups.enable(quiet=True)
libc = ctypes.CDLL(None)
libc.getenv.restype = ctypes.c_char_p
def c_env():
    return {k: (libc.getenv(k.encode()) or b"").decode() for k in ("PATH", "TMPDIR")}
ours = c_env()
with unittest.mock.patch.dict(os.environ):  # what datasets does around its downloads
    pass
reset = c_env()
from mlx_model import hf_data

class Corpus:
    pos = 0

docs = list(hf_data.disk_documents(Path(d), "text", Corpus()))
print(json.dumps({"ours": ours, "reset": reset, "after": c_env(), "docs": len(docs)}))
"""


@pytest.mark.skipif(not LINUX, reason="the C-environment set-up is Linux-only")
def test_data_path_puts_back_what_datasets_resets(tmp_path):
    """`datasets` wraps downloads in `patch.dict(os.environ)`, whose exit re-exports os.environ and
    so drops enable()'s PATH and TMPDIR (MLX would then build plain kernels into its shared
    cache). The data path calls `speedups.reapply()` after every use of `datasets`."""
    env = scratch_env(tmp_path, DS_DIR=str(tmp_path / "ds"))
    r = run(REAPPLY, env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["docs"] == 3
    assert "mlx_deepseek" in out["ours"]["TMPDIR"], out  # enable() gave MLX a private TMPDIR
    assert out["reset"]["TMPDIR"] == env["TMPDIR"], out  # patch.dict put the original back
    assert out["after"] == out["ours"], out  # and the data path restored ours
