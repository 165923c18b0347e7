"""DeepSeekMoE: a gate that picks top-k routed experts per token, stacked experts, shared experts.

Routing (SPEC section 4): scores s = sigmoid (or softmax) of x W_gate^T in float32; experts are
*selected* by top-k of s + b (b = e_score_correction_bias, optionally group-limited) but
*weighted* by the unbiased s, normalised over the chosen k if norm_topk_prob, times
routed_scaling_factor. The bias never gets a gradient; the trainer moves it by a sign rule.
Capacity (training only, when capacity_factor > 0): each expert takes at most
ceil(cf * k * T / E) tokens of each sequence, earlier tokens first, so a token's route never
depends on later tokens; overflow slots get weight 0 (the token keeps its residual path).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs
from .layers import MLP


class Routing(NamedTuple):
    """What the trainer needs from one MoE layer."""

    scores: mx.array  # [B, T, E] float32, unbiased scores s
    indices: mx.array  # [B, T, k] chosen experts
    counts: mx.array  # [E] tokens that chose each expert (before capacity dropping)
    dropped: mx.array  # [] number of (token, expert) slots dropped by capacity


def select_experts(
    logits: mx.array, bias: mx.array, args: ModelArgs
) -> tuple[mx.array, mx.array, mx.array]:
    """logits [..., E] -> (weights [..., k], indices [..., k], scores [..., E] float32)."""
    logits = logits.astype(mx.float32)
    scores = mx.sigmoid(logits) if args.scoring_func == "sigmoid" else mx.softmax(logits, -1)
    choice = scores + bias
    E, k, G = args.n_routed_experts, args.num_experts_per_tok, args.n_group
    if G > 1 and args.topk_group < G:
        grouped = choice.reshape(*choice.shape[:-1], G, E // G)
        top2 = mx.sort(grouped, axis=-1)[..., -2:].sum(-1)  # [..., G]
        drop = mx.argsort(top2, axis=-1)[..., : G - args.topk_group]  # weakest groups
        keep = 1.0 - mx.sum(mx.expand_dims(drop, -1) == mx.arange(G), axis=-2)  # [..., G]
        # Masked groups are filled with 0, as transformers and mlx-lm do (SPEC section 7).
        choice = (grouped * keep[..., None]).reshape(choice.shape)
    indices = mx.stop_gradient(mx.argsort(-choice, axis=-1)[..., :k])
    weights = mx.take_along_axis(scores, indices, axis=-1)
    if args.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights * args.routed_scaling_factor, indices, scores


def capacity_keep(indices: mx.array, n_experts: int, capacity_factor: float) -> mx.array:
    """indices [B, T, k] -> keep mask [B, T, k]: slot kept if its expert still has room.

    Priority is by position, then by rank within the token's top-k.
    """
    B, T, k = indices.shape
    cap = math.ceil(capacity_factor * k * T / n_experts)
    onehot = (indices.reshape(B, T * k, 1) == mx.arange(n_experts)).astype(mx.int32)
    position = mx.cumsum(onehot, axis=1) * onehot  # 1-based place in the expert's queue
    return (position.sum(-1) <= cap).reshape(B, T, k)


class StackedLinear(nn.Module):
    """E linear maps stored as one weight [E, out, in] (saved per expert as HF names)."""

    def __init__(self, n: int, dims_in: int, dims_out: int):
        super().__init__()
        bound = dims_in**-0.5
        self.weight = mx.random.uniform(-bound, bound, (n, dims_out, dims_in))


class Experts(nn.Module):
    """Routed SwiGLU experts with stacked weights gate_proj/up_proj/down_proj [E, out, in].

    Two dispatches that compute the same function:
    - "dense": every expert on every token, combined with a [N, E] weight matrix (zero for
      unchosen experts). E/k times the FLOPs, but plain matmuls: fastest for few experts.
    - "gather": tokens sorted by expert and run with mx.gather_mm: k/E of the dense FLOPs.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, D, I = args.n_routed_experts, args.hidden_size, args.moe_intermediate_size
        self.gate_proj = StackedLinear(E, D, I)
        self.up_proj = StackedLinear(E, D, I)
        self.down_proj = StackedLinear(E, I, D)
        self.dispatch = "dense" if E <= 4 * args.num_experts_per_tok else "gather"

    def dense(self, x: mx.array, weights: mx.array, indices: mx.array) -> mx.array:
        """x [N, D], weights/indices [N, k] -> [N, D]."""
        E = self.gate_proj.weight.shape[0]
        combine = (mx.expand_dims(indices, -1) == mx.arange(E)).astype(x.dtype)  # [N, k, E]
        combine = (combine * weights[..., None].astype(x.dtype)).sum(1)  # [N, E]
        g = x @ self.gate_proj.weight.swapaxes(-1, -2)  # [E, N, I]
        u = x @ self.up_proj.weight.swapaxes(-1, -2)
        y = (nn.silu(g) * u) @ self.down_proj.weight.swapaxes(-1, -2)  # [E, N, D]
        return (y * combine.T[..., None]).sum(0)

    def gather(self, x: mx.array, weights: mx.array, indices: mx.array) -> mx.array:
        """Sort the N*k (token, expert) slots by expert, gather_mm, unsort, combine."""
        N, k = indices.shape
        flat = indices.reshape(-1)
        order = mx.argsort(flat)
        inv = mx.argsort(order)
        xs = x[order // k][:, None, :]  # [N*k, 1, D]
        idx = flat[order]
        g = mx.gather_mm(xs, self.gate_proj.weight.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=True)
        u = mx.gather_mm(xs, self.up_proj.weight.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=True)
        y = mx.gather_mm(
            nn.silu(g) * u, self.down_proj.weight.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=True
        )  # [N*k, 1, D]
        y = y[inv].reshape(N, k, -1)
        return (y * weights[..., None].astype(y.dtype)).sum(1)

    def __call__(self, x: mx.array, weights: mx.array, indices: mx.array) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights = weights.reshape(x.shape[0], -1)
        indices = indices.reshape(x.shape[0], -1)
        fn = self.dense if self.dispatch == "dense" else self.gather
        return fn(x, weights, indices).reshape(shape)


class MoEGate(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = mx.random.normal((args.n_routed_experts, args.hidden_size)) * args.init_std
        self.e_score_correction_bias = mx.zeros((args.n_routed_experts,))
        self.freeze(keys=["e_score_correction_bias"], recurse=False)

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        bias = mx.stop_gradient(self.e_score_correction_bias)
        return select_experts(x @ self.weight.T, bias, self.args)


class MoE(nn.Module):
    """Routed experts (top-k of n_routed_experts) plus always-on shared experts."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.gate = MoEGate(args)
        self.experts = Experts(args)
        if args.n_shared_experts > 0:
            self.shared_experts = MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)

    def route(self, x: mx.array) -> tuple[mx.array, Routing]:
        """x [B, T, D] -> (output [B, T, D], routing statistics)."""
        a = self.args
        weights, indices, scores = self.gate(x)
        dropped = mx.array(0, mx.int32)
        if a.capacity_factor > 0 and self.training:
            keep = capacity_keep(indices, a.n_routed_experts, a.capacity_factor)
            dropped = (~keep).sum()
            weights = weights * keep
        y = self.experts(x, weights, indices)
        if a.n_shared_experts > 0:
            y = y + self.shared_experts(x)
        counts = (indices.reshape(-1, 1) == mx.arange(a.n_routed_experts)).sum(0)
        return y, Routing(scores, indices, counts, dropped)

    def __call__(self, x: mx.array) -> mx.array:
        return self.route(x)[0]
