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


@mx.custom_function
def swiglu(g: mx.array, u: mx.array) -> mx.array:
    """silu(g) * u, with a hand-written gradient that recomputes sigmoid(g).

    Autodiff would keep sigmoid(g) from the forward pass for the backward one; under mx.compile
    an array used in two places is not fused, so the sigmoid would run as a separate, unfused
    (on the CPU scalar, ~10x slower) kernel. Recomputing it inside each fused kernel is cheaper.
    """
    return g * mx.sigmoid(g) * u


@swiglu.vjp
def _swiglu_vjp(primals: list, cotangent: mx.array, output: mx.array) -> tuple[mx.array, mx.array]:
    g, u = primals
    # d/dg silu(g) = s + g s (1 - s), s = sigmoid(g). The two gradients spell the sigmoid two
    # ways so that compile's common-subexpression pass keeps them apart: each fuses whole.
    s = 1.0 / (1.0 + mx.exp(-g))
    dg = cotangent * u * (s + g * s * (1.0 - s))
    du = cotangent * (g * mx.sigmoid(g))
    return dg, du


class MLP(nn.Module):
    """Dense SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
