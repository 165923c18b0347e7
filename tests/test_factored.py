"""The factored second moment (`--second-moment factored`): its update against an independent
NumPy float64 reference, `full` unchanged (bit-identical to mlx's AdamW), the state's size, and
a training run that stops and resumes equal to one that does not (optimizer state round trip
through the checkpoint, with bfloat16 m, the chunked update, accumulation and clipping).

Fresh seeded inputs in every test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_model import checkpoint as ckpt
from mlx_model.memory import count_parameters, moment_bytes
from mlx_model.model import Model
from mlx_model.optim import FACTORED_EPS, make_optimizer
from mlx_model.presets import preset

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"w": (12, 7), "experts": (3, 5, 6), "norm": (9,), "emb": (10, 4)}
B1, B2, EPS, WD = 0.9, 0.95, 1e-8, 0.1


def reference_step(p, g, st, t, lr):
    """One factored-AdamW step in float64, written from the formulas (optim.AdamW docstring):
    Adam's bias-corrected update with v_hat = outer(R, C) / sum(R), R and C the row and column
    sums of the running squared gradient (per leading index of a 3-D weight); full v for 1-D
    weights; decoupled decay on ndim >= 2 only."""
    st["m"] = B1 * st["m"] + (1 - B1) * g
    if p.ndim >= 2:
        sq = g * g + FACTORED_EPS
        st["R"] = B2 * st["R"] + (1 - B2) * sq.sum(-1)  # row sums [..., out]
        st["C"] = B2 * st["C"] + (1 - B2) * sq.sum(-2)  # column sums [..., in]
        v = np.einsum("...i,...j->...ij", st["R"], st["C"]) / st["R"].sum(-1)[..., None, None]
        p = p * (1 - lr * WD)
    else:
        st["v"] = B2 * st["v"] + (1 - B2) * g * g
        v = st["v"]
    m_hat = st["m"] / (1 - B1**t)
    return p - lr * m_hat / (np.sqrt(v / (1 - B2**t)) + EPS)


@pytest.mark.parametrize("moments", [None, mx.bfloat16])
def test_factored_update_matches_float64_reference(moments):
    rng = np.random.default_rng(2024)
    params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    lrs = [1e-2, 3e-2, 2e-2, 5e-3]
    opt = make_optimizer(1e-2, weight_decay=WD, moments_dtype=moments, second_moment="factored")
    got = {k: mx.array(v.astype(np.float32)) for k, v in params.items()}
    ref = dict(params)
    state = {
        k: (
            dict(m=np.zeros(s), R=np.zeros(s[:-1]), C=np.zeros(s[:-2] + s[-1:]))
            if len(s) >= 2
            else dict(m=np.zeros(s), v=np.zeros(s))
        )
        for k, s in SHAPES.items()
    }
    for t, lr in enumerate(lrs, start=1):
        grads = {k: rng.standard_normal(s) * rng.uniform(0.1, 3.0) for k, s in SHAPES.items()}
        grads["experts"][1] = 0.0  # an expert no token chose: no 0 / 0
        grads["emb"][:3] = 0.0  # rows of tokens absent from the batch
        opt.learning_rate = lr
        got = opt.apply_gradients(
            {k: mx.array(g.astype(np.float32)) for k, g in grads.items()}, got
        )
        mx.eval(got)
        for k in ref:
            ref[k] = reference_step(ref[k], grads[k], state[k], t, lr)
        # a bfloat16 m (rounded each step, 2^-9 relative) moves each update by < 1% of lr
        tol = 2e-6 if moments is None else 2e-2 * sum(lrs[:t])
        for k in ref:
            diff = np.abs(np.array(got[k], dtype=np.float64) - ref[k]).max()
            assert np.isfinite(np.array(got[k])).all(), k
            assert diff < tol, f"step {t} {k}: max abs diff {diff:.2e} (tol {tol:.1e})"
    flat = dict(tree_flatten(opt.state))
    assert flat["states.0.experts.v_row"].shape == (3, 5)
    assert flat["states.0.experts.v_col"].shape == (3, 6)
    assert flat["states.1.norm.v"].shape == (9,)
    assert flat["states.0.w.m"].dtype == (moments or mx.float32)


@pytest.mark.parametrize("moments", [None, mx.bfloat16])
def test_full_second_moment_is_unchanged(moments):
    """second_moment='full' (the default) is mlx's AdamW, bit for bit; with bfloat16 moments
    it is mlx's AdamW whose m and v are rounded to bfloat16 after each step."""

    class Rounded(optim.AdamW):  # the moment storage as it was before the factored option
        def init_single(self, p, s):
            super().init_single(p, s)
            self.round(s)

        def apply_single(self, g, p, s):
            out = super().apply_single(g, p, s)
            self.round(s)
            return out

        def round(self, s):
            if moments is not None:
                s["m"], s["v"] = s["m"].astype(moments), s["v"].astype(moments)

    rng = np.random.default_rng(99)
    params = {k: mx.array(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()}
    ours = make_optimizer(1e-2, weight_decay=WD, moments_dtype=moments)
    kw = dict(betas=[B1, B2], eps=EPS, bias_correction=True)
    plain = optim.MultiOptimizer(
        [Rounded(1e-2, weight_decay=WD, **kw), Rounded(1e-2, weight_decay=0.0, **kw)],
        [lambda path, p: p.ndim >= 2],
    )
    a, b = dict(params), dict(params)
    for _ in range(3):
        g = {k: mx.array(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()}
        a, b = ours.apply_gradients(g, a), plain.apply_gradients(g, b)
        mx.eval(a, b)
    for k in params:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k
    sa, sb = dict(tree_flatten(ours.state)), dict(tree_flatten(plain.state))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and np.array_equal(
            np.array(sa[k].astype(mx.float32)), np.array(sb[k].astype(mx.float32))
        ), k


def test_factored_state_bytes_match_the_plan():
    args = preset("tiny")
    model = Model(args)
    opt = make_optimizer(1e-3, moments_dtype=mx.bfloat16, second_moment="factored")
    opt.init(model.trainable_parameters())
    n, _ = count_parameters(args)
    state = sum(v.nbytes for k, v in tree_flatten(opt.state) if k.rsplit(".", 1)[-1] != "step")
    lr_bytes = sum(v.nbytes for k, v in tree_flatten(opt.state) if k.endswith("learning_rate"))
    assert state - lr_bytes == moment_bytes(args, n, 2, "factored")
    full = make_optimizer(1e-3, moments_dtype=mx.bfloat16)
    full.init(model.trainable_parameters())
    full_bytes = sum(v.nbytes for k, v in tree_flatten(full.state) if k.endswith((".m", ".v")))
    assert full_bytes == moment_bytes(args, n, 2, "full") == 4 * n
    assert state - lr_bytes < 0.6 * full_bytes


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_model.train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_resume_with_factored_state_equals_uninterrupted(tmp_path):
    rng = np.random.default_rng(5)
    words = ["".join(rng.choice(list("abcdefghij"), rng.integers(2, 7))) for _ in range(200)]
    corpus = tmp_path / "a.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, 10)) + "." for _ in range(2000)))
    common = ["--preset", "tiny", "--max-steps", "6", "--log-every", "1", "--eval-every", "3"]
    common += ["--progress", "false", "--data", str(corpus), "--cache-dir", str(tmp_path / "c")]
    common += ["--second-moment", "factored", "--moments-dtype", "bfloat16"]
    common += ["--update-chunk-mb", "0.05", "--accum", "2", "--batch-size", "4", "--lanes", "1"]
    common += ["--grad-clip", "0.5"]
    whole = run_train(*common, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    part = run_train(*common, "--stop-at", "3", "--out", str(tmp_path / "part"))
    assert part.returncode == 0, part.stderr[-2000:]
    res = run_train("--resume", str(tmp_path / "part"), "--progress", "false")
    assert res.returncode == 0, res.stderr[-2000:]

    def rows(d: Path) -> list[dict]:
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]

    a, b = rows(tmp_path / "whole"), rows(tmp_path / "part")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for m in ("ce", "loss", "val_ce", "lr", "grad_norm"):
            assert x.get(m) == y.get(m), (x["step"], m, x.get(m), y.get(m))
    for name in ("model.safetensors", "optimizer.safetensors"):
        ta = ckpt.read_safetensors(tmp_path / "whole" / name)
        tb = ckpt.read_safetensors(tmp_path / "part" / name)
        assert ta.keys() == tb.keys()
        assert any(k.endswith(".v_row") for k in ta) or name == "model.safetensors"
        for k in ta:
            assert np.array_equal(
                np.array(ta[k].astype(mx.float32)), np.array(tb[k].astype(mx.float32))
            ), (name, k)
