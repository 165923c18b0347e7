"""RoPE and attention (MLA with and without q_lora_rank, MQA), causal and padding masks.

Tolerance TOL_LAYER (1e-5 relative): one layer in float32 vs float64.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

import torch_reference.model as tm
from conftest import TOL_LAYER, assert_close, mqa_args, tiny_args, to_mx, to_np, to_torch, twins
from mlx_model.cache import KVCache
from mlx_model.layers import apply_rope
from mlx_model.model import attention_mask

SHAPES = [(1, 1), (2, 7), (3, 16)]  # (batch, tokens)
CONFIGS = {
    "mla": lambda: tiny_args(),
    "mla-qlora": lambda: tiny_args(q_lora_rank=24),
    "mqa": lambda: mqa_args(),
}


@pytest.mark.parametrize("kind", ["mla", "mqa"])
@pytest.mark.parametrize("offset", [0, 13])
@pytest.mark.parametrize("B,T", SHAPES)
def test_rope(seed, kind, offset, B, T):
    args = CONFIGS[kind]()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, 3, T, args.rope_dim))
    got = apply_rope(to_mx(x), args, offset)
    xt = to_torch(x)
    ref = tm.apply_rope(xt, *tm.rope_angles(args, T, offset, xt))
    assert_close(got, ref, TOL_LAYER, f"rope {kind} offset {offset}")


def test_rope_is_interleaved():
    """Position 1 rotates pair (x0, x1) by theta^0 = 1 radian: an independent hand check."""
    args = tiny_args()
    x = np.zeros((1, 1, 2, args.rope_dim))
    x[..., 0] = 1.0  # first element of the first pair
    got = to_np(apply_rope(to_mx(x), args, 0))
    assert np.allclose(got[0, 0, 1, :2], [np.cos(1.0), np.sin(1.0)], atol=1e-6)
    assert np.allclose(got[0, 0, 1, 2:], 0.0) and np.allclose(got[0, 0, 0, :2], [1.0, 0.0])


def run_attention(mlx, ref, x: np.ndarray, pad):
    """Layer-0 attention of both twins on x [B, T, D]; returns (MLX out, twin out)."""
    B, T, _ = x.shape
    if pad is None:
        mask_mx, mask_t = attention_mask(T), tm.attention_mask(T)
    else:
        mask_mx = attention_mask(T, 0, mx.array(pad))
        mask_t = tm.attention_mask(T, 0, torch.tensor(pad))
    got = mlx.model.layers[0].self_attn(to_mx(x), mask_mx)
    want = ref.model.layers[0].self_attn(to_torch(x), mask_t)
    return to_np(got), to_np(want)


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padmask"])
@pytest.mark.parametrize("B,T", SHAPES)
def test_attention(seed, kind, padded, B, T):
    args = CONFIGS[kind]()
    mlx, ref = twins(args)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, args.hidden_size))
    pad = rng.integers(0, T, size=B).tolist() if padded else None
    got, want = run_attention(mlx, ref, x, pad)
    assert_close(got, want, TOL_LAYER, f"{kind} attention pad={pad}")


@pytest.mark.parametrize("T", [1, 6])
def test_padding_mask_matches_twin(T):
    """Both masks equal a hand-built one: query t of row b sees keys pad[b]..t; a query inside
    the padding sees only itself (no row entirely masked)."""
    pad = [0, 2, T - 1]
    got = to_np(attention_mask(T, 0, mx.array(pad)))
    want = to_np(tm.attention_mask(T, 0, torch.tensor(pad)))
    hand = np.zeros((3, 1, T, T), bool)
    for b, p in enumerate(pad):
        for t in range(T):
            hand[b, 0, t, p : t + 1] = True
            hand[b, 0, t, t] = True
    assert got.shape == (3, 1, T, T) and (got == hand).all() and (want == hand).all()


def test_mla_naive_equals_absorbed(seed):
    """Same-twin check: the decode path (kv_b_proj absorbed) equals the expanded path."""
    args = tiny_args(q_lora_rank=24)
    mlx, _ = twins(args)
    attn = mlx.model.layers[0].self_attn
    rng = np.random.default_rng(seed)
    x = to_mx(rng.standard_normal((2, 9, args.hidden_size)))
    q_nope, q_rope, latent, k_rope = attn.project(x, 0)
    # The last query against all 9 keys: no mask needed.
    q_nope, q_rope = q_nope[:, :, -1:], q_rope[:, :, -1:]
    naive = attn.naive(q_nope, q_rope, latent, k_rope, None)
    absorbed = attn.absorbed(q_nope, q_rope, latent, k_rope, None)
    assert_close(absorbed, naive, TOL_LAYER, "absorbed vs naive MLA")


@pytest.mark.parametrize("kind", ["mla", "mqa"])
def test_causal_string_is_bottom_right_aligned(seed, kind):
    """mask="causal" with more keys than queries (chunked prefill after a cache) must let
    query i see keys up to S - L + i, like an explicit offset mask."""
    args = CONFIGS[kind]()
    mlx, _ = twins(args)
    attn = mlx.model.layers[0].self_attn
    rng = np.random.default_rng(seed)
    x = to_mx(rng.standard_normal((2, 9, args.hidden_size)))
    outs = {}
    for name, mask in [("causal", "causal"), ("explicit", attention_mask(4, 5, mx.array([0, 0])))]:
        cache = KVCache()
        attn(x[:, :5], "causal", cache)  # prefill 5 tokens
        outs[name] = attn(x[:, 5:], mask, cache)  # 4 new queries against 9 keys
    assert_close(outs["causal"], outs["explicit"], 1e-6, "causal string vs explicit offset mask")
