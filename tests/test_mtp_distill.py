"""MTP self-distillation: the MTP module learns the model's own greedy continuations while the
model itself (and so plain decoding) stays bit for bit the same."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from conftest import decode_args
from mlx_model.checkpoint import save_model
from mlx_model.data import train_tokenizer
from mlx_model.model import Model
from mlx_model.mtp_distill import agreement, continuations, distill

ROOT = Path(__file__).resolve().parents[1]


def test_distill_teaches_the_mtp_module_and_leaves_the_model_alone():
    mx.random.seed(3)
    model = Model(decode_args("mla", num_nextn_predict_layers=1))
    model.eval()
    rng = np.random.default_rng(3)
    prompts = rng.integers(1, 400, (24, 6)).tolist()
    seqs = continuations(model, prompts, 10, batch=12)
    assert seqs.shape == (24, 16)
    # the continuation is the model's own greedy choice at every position
    logits = model(seqs)
    assert (mx.argmax(logits[:, 5:-1], -1) == seqs[:, 6:]).all().item()
    main = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if not k.startswith("mtp")}
    before = agreement(model, seqs, 6)
    losses = list(distill(model, seqs, 6, steps=60, batch=8, lr=3e-3, seed=0))
    after = agreement(model, seqs, 6)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), losses
    assert after > before + 0.3, (before, after)  # chance agreement on 512 tokens is ~0
    for k, v in tree_flatten(model.parameters()):
        if not k.startswith("mtp"):
            assert np.array_equal(np.array(v), main[k]), f"{k} changed"


def test_cli_refuses_a_checkpoint_without_mtp(tmp_path):
    mx.random.seed(0)
    model = Model(decode_args("mla"))
    tok = train_tokenizer(["some text to train a tokenizer on, " * 20], 300)
    save_model(tmp_path / "m", model, tok)
    r = subprocess.run(
        [sys.executable, "-m", "mlx_model.mtp_distill", "--model", str(tmp_path / "m")]
        + ["--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error:") and "no MTP weights" in r.stderr
    assert not (tmp_path / "o").exists()
