"""The fast BLAS that `mlx_model.speedups.enable()` loads for MLX's CPU backend gives correct results.

Each check runs in a fresh interpreter: the library must be loaded before `mlx.core` is first
imported, and pytest's own process imported MLX long ago. Correctness only, no timings.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Prints a JSON line: the library loaded, and the relative errors of MLX float32 results
# against NumPy float64 on seeded inputs.
CHECK = r"""
import json, sys
from mlx_model import speedups
st = speedups.enable()
import mlx.core as mx
import mlx.nn as nn
import numpy as np

rng = np.random.default_rng(0)
a = rng.standard_normal((256, 300)).astype(np.float32)
b = rng.standard_normal((300, 200)).astype(np.float32)
c = rng.standard_normal((64, 64)).astype(np.float32) + 8 * np.eye(64, dtype=np.float32)

def rel(x, ref):
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))

out = {"blas": st.blas, "codegen": st.kernels}
ref = a.astype(np.float64) @ b.astype(np.float64)
out["matmul"] = rel(mx.array(a) @ mx.array(b), ref)
out["matmul_t"] = rel(mx.array(b).T @ mx.array(a).T, ref.T)  # transposed operands
bat = rng.standard_normal((3, 40, 50)).astype(np.float32)
out["batched"] = rel(mx.array(bat) @ mx.array(bat).swapaxes(1, 2),
                     bat.astype(np.float64) @ bat.astype(np.float64).transpose(0, 2, 1))
# LAPACK routines come from the same library when it provides them.
out["inv"] = rel(mx.linalg.inv(mx.array(c), stream=mx.cpu), np.linalg.inv(c.astype(np.float64)))
# An mx.compile'd kernel, built by g++ (through the AVX2 wrapper where it is installed).
x, y = mx.array(a[:, :200]), mx.array(a[:, 100:])
f = mx.compile(lambda u, v: nn.silu(u) * v)
xd, yd = np.asarray(x, np.float64), np.asarray(y, np.float64)
out["compiled_silu_mul"] = rel(f(x, y), xd / (1 + np.exp(-xd)) * yd)
print(json.dumps(out))
"""


def run_check(env_extra: dict, tmp_path: Path, code: str = CHECK) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLX_MODEL_BLAS", "MLX_MODEL_NATIVE_CODEGEN")
    }
    env.update(env_extra)
    env["TMPDIR"] = str(tmp_path)  # MLX's shared kernel cache: must stay untouched by ours
    env["MLX_MODEL_KERNEL_CACHE"] = str(tmp_path / "kernels")  # fresh: kernels are really built
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def check_errors(out: dict) -> None:
    for k in ("matmul", "matmul_t", "batched", "inv", "compiled_silu_mul"):
        assert out[k] < 1e-5, (k, out)


def installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_default_blas_is_correct(tmp_path):
    out = run_check({}, tmp_path)
    check_errors(out)
    if sys.platform.startswith("linux") and installed("mkl"):  # the `fast` extra
        assert out["blas"] and "libmkl_rt" in out["blas"], out
    if out["codegen"]:  # the kernel went through the g++ wrapper into the fresh private cache
        assert list(tmp_path.glob("kernels/jit-*/tmp/mlx/*/cpu/lib*.so")), out
        assert not (tmp_path / "mlx").exists(), "MLX's shared kernel cache was used"


def test_blas_none_still_works(tmp_path):
    out = run_check({"MLX_MODEL_BLAS": "none", "MLX_MODEL_NATIVE_CODEGEN": "0"}, tmp_path)
    assert out["blas"] is None and out["codegen"] is None
    check_errors(out)


def test_forced_bad_blas_falls_back_to_reference(tmp_path):
    out = run_check({"MLX_MODEL_BLAS": str(tmp_path / "no_such_libblas.so")}, tmp_path)
    assert out["blas"] is None
    check_errors(out)


def test_too_late_is_a_no_op(tmp_path):
    code = "import mlx.core\n" + CHECK  # MLX first: nothing can be loaded any more
    out = run_check({}, tmp_path, code)
    assert out["blas"] is None
    check_errors(out)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_torch_and_numpy_beside_it(tmp_path):
    """torch (its own MKL and OpenMP) and NumPy (its OpenBLAS) still compute right beside it."""
    code = r"""
import json
from mlx_model import speedups
speedups.enable()
import torch
import numpy as np
import mlx.core as mx
g = torch.Generator().manual_seed(0)
a, b = torch.randn(256, 300, generator=g), torch.randn(300, 200, generator=g)
ref = a.double() @ b.double()
rel = lambda x: float((x.double() - ref).norm() / ref.norm())
an, bn = a.numpy(), b.numpy()
out = {"torch": rel(a @ b), "numpy": rel(torch.from_numpy(an @ bn)),
       "mlx": rel(torch.from_numpy(np.array(mx.array(an) @ mx.array(bn))))}
print(json.dumps(out))
"""
    out = run_check({}, tmp_path, code)
    assert max(out.values()) < 1e-5, out


def test_vectorised_kernels_compute_what_mlx_does(tmp_path):
    """Kernels built through the g++ wrapper (AVX2, inlined preamble maths) give bit-for-bit
    MLX's own uncompiled results, special values included; and where the wrapper is active the
    built kernels export none of MLX's maths (an exported copy is what the loader binds to
    libmlx.so's scalar one, one call per element; a hidden one is inlined and vectorised)."""
    code = r"""
import json
from mlx_model import speedups
st = speedups.enable()
import mlx.core as mx
import numpy as np
rng = np.random.default_rng(0)
x = rng.standard_normal(4099).astype(np.float32) * 30  # not a multiple of the vector width
x[:8] = [0.0, -0.0, np.inf, -np.inf, np.nan, 88.5, -88.5, 1e-30]
x, y = mx.array(x), mx.array(rng.standard_normal(4099).astype(np.float32))
fns = {
    "exp": lambda a, b: mx.exp(a - b),
    "sigmoid": lambda a, b: mx.sigmoid(a) * b,
    "log": lambda a, b: mx.log(mx.abs(a) + 1e-3) * b,
    "tanh": lambda a, b: mx.tanh(a) + b,
    "select": lambda a, b: mx.where(a > b, a * 2, b - 1),
}
out = {"codegen": st.kernels}
for name, f in fns.items():
    got, ref = np.array(mx.compile(f)(x, y)), np.array(f(x, y))
    out[name] = bool(np.array_equal(got, ref, equal_nan=True))
print(json.dumps(out))
"""
    out = run_check({}, tmp_path, code)
    codegen = out.pop("codegen")
    assert all(out.values()), out
    if codegen:
        import shutil

        libs = list(tmp_path.glob("kernels/jit-*/tmp/mlx/*/cpu/lib*.so"))
        assert libs
        nm = shutil.which("nm")
        if nm:
            for lib in libs:
                dynsyms = subprocess.run(
                    [nm, "-D", "-C", str(lib)], capture_output=True, text=True
                ).stdout
                assert "mlx::core::" not in dynsyms, (lib.name, dynsyms)
