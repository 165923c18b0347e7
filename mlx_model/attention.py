"""Attention: Multi-head Latent Attention (DeepSeek-V2/V3) and the seed's multi-query attention.

MLA (SPEC section 3). Shapes: B batch, L new tokens, S cached + new tokens, H heads.
- kv_a_proj_with_mqa(x) -> [c_kv (r) | k_rope (d_r)]; RMSNorm on c_kv only; k_rope is one head.
- kv_b_proj(c_kv) -> per head [k_nope (d_n) | v (d_v)].
- Naive path (training, prefill): expand keys/values from the latent and run SDPA.
- Absorbed path (decode: a cache and L <= ABSORB_MAX_L new tokens, one token or a speculative
  verification block): fold kv_b_proj's key part into the query and its value part into the
  output, so attention runs against the cached latent directly.
Both attentions take `at` (a scalar array): all L rows are written to the cache but only row
`at` queries it, output [B, 1, D] (speculative drafting needs one row of a re-read block).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs
from .layers import apply_rope

Mask = None | str | mx.array
ABSORB_MAX_L = 16  # new tokens up to which a cached MLA call attends in latent space


def sdpa(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask) -> mx.array:
    """Scaled-dot-product attention; K/V may have 1 head (broadcast to all heads).

    q [B, H, L, d], k [B, 1|H, S, d], v [B, 1|H, S, d_v] -> [B, H, L, d_v]. On a GPU this is
    the fused mx.fast kernel. MLX's CPU backend has no fused kernel (mx.fast falls back to
    matmul + the softmax primitive), and the written-out softmax below is ~1.6-2x faster there:
    under mx.compile its subtract + exp become one JIT-compiled elementwise kernel, ~3x faster
    than the precompiled exp inside the softmax primitive. Same maths either way.
    """
    if mx.default_device() == mx.gpu:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return attention_cpu(q, k, v, scale, mask)


def attention_cpu(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask) -> mx.array:
    """softmax(q k^T * scale + mask) v with the softmax written out (float32 scores)."""
    L, S = q.shape[2], k.shape[2]
    s = ((q * scale) @ k.swapaxes(-1, -2)).astype(mx.float32)  # [B, H, L, S]
    if isinstance(mask, str):  # "causal": query i sits at position S - L + i
        mask = mx.arange(S)[None, :] <= mx.arange(L)[:, None] + (S - L)
    if mask is not None:
        if mask.dtype == mx.bool_:
            s = mx.where(mask, s, mx.finfo(mx.float32).min)
        else:
            s = s + mask.astype(mx.float32)
    e = mx.exp(s - mx.stop_gradient(s.max(-1, keepdims=True)))
    p = (e / e.sum(-1, keepdims=True)).astype(v.dtype)
    return p @ v


class MLA(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        H, d_n, d_r, d_v = (
            args.num_attention_heads,
            args.qk_nope_head_dim,
            args.qk_rope_head_dim,
            args.v_head_dim,
        )
        D, r = args.hidden_size, args.kv_lora_rank
        self.scale = args.softmax_scale
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * (d_n + d_r), bias=False)
        else:
            self.q_a_proj = nn.Linear(D, args.q_lora_rank, bias=False)
            self.q_a_layernorm = nn.RMSNorm(args.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(args.q_lora_rank, H * (d_n + d_r), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, r + d_r, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(r, eps=1e-6)
        self.kv_b_proj = nn.Linear(r, H * (d_n + d_v), bias=False)
        self.o_proj = nn.Linear(H * d_v, D, bias=False)

    def _queries(self, x: mx.array) -> mx.array:
        if self.args.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def project(self, x: mx.array, offset: Any) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """x [B, L, D] -> q_nope [B,H,L,d_n], q_rope [B,H,L,d_r] (rotated),
        latent [B,1,L,r] (normalised), k_rope [B,1,L,d_r] (rotated)."""
        a = self.args
        B, L, _ = x.shape
        q = self._queries(x).reshape(B, L, a.num_attention_heads, -1).transpose(0, 2, 1, 3)
        q_nope, q_rope = mx.split(q, [a.qk_nope_head_dim], axis=-1)
        kv = self.kv_a_proj_with_mqa(x)
        latent, k_rope = mx.split(kv, [a.kv_lora_rank], axis=-1)
        latent = self.kv_a_layernorm(latent)[:, None]  # [B, 1, L, r]
        k_rope = k_rope[:, None]  # [B, 1, L, d_r]
        return q_nope, apply_rope(q_rope, a, offset), latent, apply_rope(k_rope, a, offset)

    def naive(self, q_nope, q_rope, latent, k_rope, mask: Mask) -> mx.array:
        """Expand per-head keys/values from the latent; returns [B, H, L, d_v]."""
        a = self.args
        B, H, S = latent.shape[0], a.num_attention_heads, latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0])  # [B, S, H*(d_n+d_v)]
        kv = kv.reshape(B, S, H, -1).transpose(0, 2, 1, 3)  # [B, H, S, d_n+d_v]
        k_nope, v = mx.split(kv, [a.qk_nope_head_dim], axis=-1)
        k = mx.concatenate([k_nope, mx.broadcast_to(k_rope, (B, H, S, a.qk_rope_head_dim))], -1)
        q = mx.concatenate([q_nope, q_rope], axis=-1)
        return sdpa(q, k, v, self.scale, mask)

    def absorbed(self, q_nope, q_rope, latent, k_rope, mask: Mask) -> mx.array:
        """Attend in latent space: scores = (q_nope W_uk) c^T + q_rope k_rope^T; returns [B,H,L,d_v]."""
        a = self.args
        H, d_n = a.num_attention_heads, a.qk_nope_head_dim
        w = self.kv_b_proj.weight.reshape(H, d_n + a.v_head_dim, a.kv_lora_rank)
        w_uk, w_uv = w[:, :d_n], w[:, d_n:]  # [H, d_n, r], [H, d_v, r]
        q_lat = q_nope @ w_uk  # [B, H, L, r]
        q = mx.concatenate([q_lat, q_rope], axis=-1)
        k = mx.concatenate([latent, k_rope], axis=-1)  # [B, 1, S, r + d_r]
        out = sdpa(q, k, latent, self.scale, mask)  # [B, H, L, r]
        return out @ w_uv.swapaxes(-1, -2)  # [B, H, L, d_v]

    def __call__(
        self, x: mx.array, mask: Mask = "causal", cache: Any | None = None, at: Any = None
    ) -> mx.array:
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0
        q_nope, q_rope, latent, k_rope = self.project(x, offset)
        if cache is not None:
            latent, k_rope = cache.update_and_fetch(latent, k_rope)
        if at is not None:  # every row enters the cache, only row `at` queries it
            q_nope, q_rope, L = _row(q_nope, at), _row(q_rope, at), 1
        attend = self.absorbed if (cache is not None and L <= ABSORB_MAX_L) else self.naive
        out = attend(q_nope, q_rope, latent, k_rope, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MQA(nn.Module):
    """The seed's multi-query attention: H query heads, one shared K/V head, RoPE, causal."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        D, H, hd = args.hidden_size, args.num_attention_heads, args.head_dim
        self.scale = hd**-0.5
        self.q_proj = nn.Linear(D, H * hd, bias=False)
        self.k_proj = nn.Linear(D, hd, bias=False)
        self.v_proj = nn.Linear(D, hd, bias=False)
        self.o_proj = nn.Linear(H * hd, D, bias=False)

    def __call__(
        self, x: mx.array, mask: Mask = "causal", cache: Any | None = None, at: Any = None
    ) -> mx.array:
        a = self.args
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0
        q = self.q_proj(x).reshape(B, L, a.num_attention_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x)[:, None]  # [B, 1, L, hd]
        v = self.v_proj(x)[:, None]
        q, k = apply_rope(q, a, offset), apply_rope(k, a, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if at is not None:  # every row enters the cache, only row `at` queries it
            q, L = _row(q, at), 1
        out = sdpa(q, k, v, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def _row(q: mx.array, at: mx.array) -> mx.array:
    """Query row `at` (a scalar array) of q [B, H, L, d] -> [B, H, 1, d]."""
    return mx.take(q, at.reshape(1), axis=2)


def make_attention(args: ModelArgs) -> nn.Module:
    return MLA(args) if args.attention_type == "mla" else MQA(args)
