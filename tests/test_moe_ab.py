"""tools.moe_ab: the floor row's fixed-layout experts against a float64 NumPy reference, the
command end to end at tiny size, and bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_model.moe import Experts
from mlx_model.presets import preset
from tools.moe_ab import fixed_gather

ROOT = Path(__file__).resolve().parents[1]


def test_fixed_gather_matches_float64_reference():
    """Slot (token, j) is row j*N + token of the S = N*k slots; expert e takes rows
    e*S/E .. (e+1)*S/E - 1; the output is sum_j w[token, j] * expert(row)(x[token])."""
    args = preset("tiny")
    E, k = args.n_routed_experts, args.num_experts_per_tok
    rng = np.random.default_rng(3)
    mx.random.seed(3)
    ex = Experts(args)
    N = 6 * E  # S = N*k splits evenly over E
    x = rng.standard_normal((N, args.hidden_size)).astype(np.float32)
    w = rng.random((N, k)).astype(np.float32)
    idx = rng.integers(0, E, (N, k)).astype(np.int32)  # ignored by the fixed layout
    got = np.array(fixed_gather(ex, mx.array(x), mx.array(w), mx.array(idx)))

    g, u, d = (
        np.array(p.weight).astype(np.float64) for p in (ex.gate_proj, ex.up_proj, ex.down_proj)
    )
    ref = np.zeros((N, args.hidden_size))
    rows_per_expert = N * k // E
    for j in range(k):
        for t in range(N):
            e = (j * N + t) // rows_per_expert
            a, b = g[e] @ x[t], u[e] @ x[t]
            ref[t] += w[t, j] * (d[e] @ (a / (1 + np.exp(-a)) * b))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.moe_ab", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_end_to_end_tiny():
    r = run("--preset", "tiny", "--rounds", "2", "--batch-size", "2", "--seq-len", "16")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    for row in ("dense", "moe", "floor"):
        line = next(ln for ln in lines if ln.startswith(row + " "))
        assert "x wall" in line and "x CPU" in line
    assert any(ln.startswith("routing's share of the MoE step") for ln in lines)


def test_bad_input_one_error_line():
    for args, needle in (
        (("--preset", "small-dense"), "has no MoE layer"),
        (("--preset", "nope"), "unknown preset"),
        (("--preset", "tiny", "--batch-size", "1", "--seq-len", "3"), "divisible"),
    ):
        r = run(*args)
        assert r.returncode == 2, (args, r.stderr)
        errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
        assert len(errors) == 1 and needle in errors[0], (args, r.stderr)
        assert "Traceback" not in r.stderr
