"""Small building blocks: RoPE (interleaved, as in DeepSeek), norms, the dense SwiGLU MLP."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs


def apply_rope(x: mx.array, args: ModelArgs, offset: int | mx.array = 0) -> mx.array:
    """Rotate interleaved pairs (2i, 2i+1) of the last axis; positions run along axis -2.

    x: [B, heads, T, rope_dim]. Frequency of pair i is rope_theta^(-2i/rope_dim).
    """
    return mx.fast.rope(
        x, args.rope_dim, traditional=True, base=args.rope_theta, scale=1.0, offset=offset
    )


def make_norm(args: ModelArgs, dims: int) -> nn.Module:
    """RMSNorm (DeepSeek) or LayerNorm with bias (the seed), both fused in mx.fast."""
    if args.norm_type == "layernorm":
        return nn.LayerNorm(dims, eps=1e-5)
    return nn.RMSNorm(dims, eps=args.rms_norm_eps)


class MLP(nn.Module):
    """Dense SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))
