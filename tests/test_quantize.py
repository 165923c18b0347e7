"""Quantized weights: the quantized expert path, our quantized directories, mlx-lm's, the CLIs.

Models are fresh seeded random tiny MLA ones (Hugging Face form, MTP depth 1) with a larger
init_std so greedy choices are not near-ties; float32. Error bounds are stated at each check.
"""

from __future__ import annotations

import mlx_model  # noqa: F401  # isort: skip  (loads a fast BLAS before MLX)

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_model.checkpoint import CheckpointError, load_model, save_model
from mlx_model.data import train_tokenizer
from mlx_model.engine import Engine
from mlx_model.generation import load
from mlx_model.model import Model
from mlx_model.moe import Experts, QuantizedStackedLinear
from mlx_model.presets import preset
from mlx_model.quantize import (
    QuantizeError,
    load_quantized,
    quantize_model,
    save_quantized,
    weight_bytes,
    write_quantized,
)
from mlx_model.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def rel(a: mx.array, b: mx.array) -> float:
    return float(mx.linalg.norm(a - b) / mx.linalg.norm(b))


def tiny(seed: int = 0, **kw) -> Model:
    mx.random.seed(seed)
    args = preset("tiny").replace(**{"init_std": 0.3, "num_nextn_predict_layers": 1, **kw})
    m = Model(args)
    m.eval()
    mx.eval(m.parameters())
    return m


def greedy(model, prompt: list[int], n: int, compiled: bool = False) -> list[int]:
    params = SamplingParams(max_tokens=n, temperature=0)
    return [t[0] for t in Engine(model).decode([prompt], params, compiled=compiled)]


@pytest.fixture(scope="module")
def tok():
    from pydoc_data.topics import topics

    return train_tokenizer([topics[k] for k in sorted(topics)][:40], vocab_size=400)


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory, tok) -> Path:
    d = tmp_path_factory.mktemp("float")
    save_model(d, tiny(), tok)
    return d


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_experts_equal_dequantized_dense(bits):
    """gather_qmm over packed stacked experts == float experts holding the dequantized weights
    (both dispatches: one row per slot and blocked), rel err < 1e-5."""
    args = preset("tiny")
    mx.random.seed(1)
    experts = Experts(args)
    rng = np.random.default_rng(bits)
    for n_tok in (3, 200):  # decode-sized and block-sized
        x = mx.array(rng.normal(size=(n_tok, args.hidden_size)).astype(np.float32))
        idx = mx.array(np.stack([rng.permutation(4)[:2] for _ in range(n_tok)]))
        w = mx.array(rng.random((n_tok, 2)).astype(np.float32))
        q = Experts(args)
        q.update(experts.parameters())
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(q, name, getattr(experts, name).to_quantized(32, bits))
        assert isinstance(q.gate_proj, QuantizedStackedLinear)
        deq = Experts(args)
        for name in ("gate_proj", "up_proj", "down_proj"):
            p = getattr(q, name)
            getattr(deq, name).weight = mx.dequantize(p.weight, p.scales, p.biases, 32, bits)
        err = rel(q(x, w, idx), deq(x, w, idx))
        assert err < 1e-5, f"{bits}-bit, {n_tok} tokens: rel err {err:.2e}"


def test_quantize_model_sizes_errors_and_decoding():
    """8-bit logits within 2% of float (rel), 4-bit within 25%; 4-bit weight bytes <= 0.3x
    float32 (training-sized init_std 0.02: the 0.3 of the other tests amplifies any change);
    the compiled and eager decode steps agree on the quantized model."""
    ref = tiny(init_std=0.02)
    ids = mx.array(np.random.default_rng(2).integers(1, 400, (2, 12)))
    want, fbytes = ref(ids), weight_bytes(ref)
    for bits, tol in ((8, 0.02), (4, 0.25)):
        q = tiny(init_std=0.02)
        quantize_model(q, bits, 32)
        err = rel(q(ids), want)
        assert err < tol, f"{bits}-bit logits rel err {err:.3f}"
        if bits == 4:
            assert weight_bytes(q) <= 0.3 * fbytes, weight_bytes(q) / fbytes
        assert greedy(q, [3, 1, 4, 1, 5], 8) == greedy(q, [3, 1, 4, 1, 5], 8, compiled=True)
    with pytest.raises(QuantizeError, match="--quantize 3"):
        quantize_model(tiny(), 3)


def test_our_quantized_directory_round_trip(tmp_path, float_dir, tok):
    """save_quantized -> load_quantized gives identical logits; load() and the generate CLI
    read it; training from it is refused with one line."""
    model, _ = load(str(float_dir), quantize=4, group_size=32)
    d = tmp_path / "q4"
    save_quantized(model, d, tok)
    again = load_quantized(d)
    ids = mx.array([[5, 9, 2, 7, 1]])
    assert mx.array_equal(again(ids), model(ids)) and again.mtp
    with pytest.raises(CheckpointError, match="generation only"):
        load_model(d)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "mlx_model.train", "--init-from", str(d), "--max-steps", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "generation only" in lines[0], r.stderr


def test_mlx_lm_quantized_directory_decodes_like_mlx_lm(tmp_path, float_dir):
    """`mlx_lm convert -q` of our checkpoint, and our `tools.convert --quantize 4`: our greedy
    tokens equal mlx-lm's greedy tokens on the same directory (16 tokens, 2 prompts)."""
    from mlx_lm.convert import convert
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model as lm_load

    theirs = tmp_path / "mlx-lm-q4"
    convert(str(float_dir), str(theirs), quantize=True, q_bits=4, q_group_size=32)
    ours = tmp_path / "ours-q4"
    write_quantized(float_dir, ours, 4, 32)
    for d in (theirs, ours):
        model, _ = load(str(d))
        lm = lm_load(d)[0]
        for prompt in ([5, 17, 42, 7], [3, 300, 12]):
            steps = generate_step(
                mx.array(prompt), lm, max_tokens=16, sampler=lambda x: mx.argmax(x, axis=-1)
            )
            want = [int(t) for t, _ in steps]
            assert greedy(model, prompt, 16) == want, d.name
            assert len(set(want)) > 3
