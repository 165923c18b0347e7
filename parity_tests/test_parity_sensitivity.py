"""The parity checks must catch real mistakes: plant a small fault in the torch twin (by
monkeypatching one of its functions or attributes within the test) and assert that the same
comparison that passes on the healthy twin now fails, far above its tolerance.

Faults: rotate-half RoPE instead of interleaved pairs; a routing bias that also scales the
expert weights; a wrong softmax scale; an off-by-one causal mask (both directions).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

import torch_reference.model as tm
from conftest import (
    TOL_LAYER,
    TOL_LOGITS,
    assert_close,
    mqa_args,
    random_bias,
    rel_err,
    set_bias,
    tiny_args,
    to_mx,
    to_torch,
    twins,
)
from mlx_model.model import attention_mask


def expect_failure(check, tol: float) -> float:
    """check() -> (got, ref, what); the helper must raise, the error must be >= 10x tol."""
    got, ref, what = check()
    with pytest.raises(AssertionError, match="rel err"):
        assert_close(got, ref, tol, what)
    err = rel_err(got, ref)
    assert err > 10 * tol, f"{what}: the fault moved the result by only {err:.1e}"
    return err


def attention_check(args, seed: int, B: int = 2, T: int = 9):
    mlx, ref = twins(args)
    x = np.random.default_rng(seed).standard_normal((B, T, args.hidden_size))

    def check():
        got = mlx.model.layers[0].self_attn(to_mx(x), attention_mask(T))
        want = ref.model.layers[0].self_attn(to_torch(x), tm.attention_mask(T))
        return got, want, "attention"

    return check, ref


def logits_check(args, seed: int, B: int = 2, T: int = 9):
    mlx, ref = twins(args)
    tokens = np.random.default_rng(seed).integers(0, args.vocab_size, size=(B, T))

    def check():
        return mlx(mx.array(tokens)), ref(torch.from_numpy(tokens))[0], "logits"

    return check


def rotate_half_rope(x, cos, sin):
    """The non-interleaved (GPT-NeoX / Llama) convention: pairs (i, i + d/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


@pytest.mark.parametrize("kind", ["mla", "mqa"])
def test_rope_convention_fault(seed, monkeypatch, kind):
    args = tiny_args() if kind == "mla" else mqa_args()
    check, _ = attention_check(args, seed)
    assert_close(*check()[:2], TOL_LAYER, "healthy twin")
    monkeypatch.setattr(tm, "apply_rope", rotate_half_rope)
    expect_failure(check, TOL_LAYER)


def test_bias_scaling_weights_fault(seed, monkeypatch):
    """Weights taken from s + b instead of the unbiased s (selection unchanged)."""
    args = tiny_args()
    mlx, ref = twins(args)
    rng = np.random.default_rng(seed)
    bias = random_bias(rng, args.n_routed_experts, 0.05)
    set_bias(mlx.model.layers[1].mlp, ref.model.layers[1].mlp, bias)
    x = rng.standard_normal((2, 9, args.hidden_size))

    def check():
        got = mlx.model.layers[1].mlp(to_mx(x))
        return got, ref.model.layers[1].mlp(to_torch(x)), "MoE output"

    assert_close(*check()[:2], TOL_LAYER, "healthy twin")
    healthy = tm.select_experts

    def biased_weights(logits, b, a):
        _, indices, scores = healthy(logits, b, a)
        w = (scores + b.to(scores.dtype)).gather(-1, indices)
        w = w / w.sum(-1, keepdim=True) if a.norm_topk_prob else w
        return w * a.routed_scaling_factor, indices, scores

    monkeypatch.setattr(tm, "select_experts", biased_weights)
    expect_failure(check, TOL_LAYER)


@pytest.mark.parametrize("kind", ["mla", "mqa"])
def test_softmax_scale_fault(seed, monkeypatch, kind):
    """MLA: (qk_nope_head_dim)^-0.5, forgetting the rope part; MQA: 1/head_dim."""
    args = tiny_args() if kind == "mla" else mqa_args()
    check, ref = attention_check(args, seed)
    assert_close(*check()[:2], TOL_LAYER, "healthy twin")
    wrong = args.qk_nope_head_dim**-0.5 if kind == "mla" else 1 / args.head_dim
    monkeypatch.setattr(ref.model.layers[0].self_attn, "scale", wrong)
    expect_failure(check, TOL_LAYER)


@pytest.mark.parametrize("shift", [1, -1], ids=["sees-next", "hides-self"])
def test_causal_mask_off_by_one_fault(seed, monkeypatch, shift):
    check = logits_check(tiny_args(), seed)
    assert_close(*check()[:2], TOL_LOGITS, "healthy twin")

    def off_by_one(T, offset=0):
        keys = torch.arange(offset + T)
        return keys[None, :] <= (torch.arange(T) + offset + shift)[:, None]

    monkeypatch.setattr(tm, "causal_mask", off_by_one)
    expect_failure(check, TOL_LOGITS)
