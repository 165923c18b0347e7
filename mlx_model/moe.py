"""DeepSeekMoE: a gate that picks top-k routed experts per token, stacked experts, shared experts.

Routing (SPEC section 4): scores s = sigmoid (or softmax) of x W_gate^T in float32; experts are
*selected* by top-k of s + b (b = e_score_correction_bias, optionally group-limited) but
*weighted* by the unbiased s, normalised over the chosen k if norm_topk_prob, times
routed_scaling_factor. The bias never gets a gradient; the trainer moves it after each step
(loss.bias_delta: the relative-error rule by default, or DeepSeek-V3's sign rule).
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
from .layers import MLP, swiglu


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
        # Masked groups get -inf, as in DeepSeek-V3's inference code and transformers (SPEC
        # section 7; mlx-lm fills 0): only experts of kept groups can be chosen.
        choice = mx.where(keep[..., None] > 0, grouped, -mx.inf).reshape(choice.shape)
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

    def gather(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """x [..., rows, in] times expert indices[...]'s matrix, transposed -> [..., rows, out]."""
        w = self.weight.swapaxes(-1, -2)
        return mx.gather_mm(x, w, rhs_indices=indices, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int, bits: int, mode: str = "affine") -> nn.Module:
        """nn.quantize's hook: the same experts, weights packed to `bits` (affine)."""
        w, s, b = mx.quantize(self.weight, group_size=group_size, bits=bits, mode=mode)
        return QuantizedStackedLinear(w, s, b, group_size, bits)


class QuantizedStackedLinear(nn.Module):
    """E quantized linear maps: packed weight [E, out, in*bits/32], scales/biases
    [E, out, in/group]; multiplied by MLX's quantized gather matmul, mx.gather_qmm."""

    def __init__(self, weight, scales, biases, group_size: int, bits: int):
        super().__init__()
        self.weight, self.scales, self.biases = weight, scales, biases
        self.group_size, self.bits = group_size, bits
        self.freeze()

    def gather(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.biases,
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            sorted_indices=sorted_indices,
        )


def block_layout(indices: mx.array, n_experts: int, b: int) -> tuple:
    """Where each (token, expert) slot goes when slots are grouped by expert into blocks of b rows.

    indices [N, k] -> (dest [N, k] row of each slot, row_slot [R] slot of each row or S for a
    padding row, block_expert [R/b] expert of each block, R). Each expert's group but the last
    is padded to a whole number of blocks (the last group ends in the trailing blocks, which
    belong to the last expert anyway), so at most S + (E-1)*(b-1) rows are used for any
    routing: R is that, rounded up to a block, and every shape is static. One argsort of the
    slots' experts does the grouping.
    """
    N, k = indices.shape
    E, S = n_experts, N * k
    R = -(-(S + (E - 1) * (b - 1)) // b) * b
    flat = indices.reshape(-1)  # [S] expert of each slot (slot = token * k + rank)
    order = mx.argsort(flat)  # [S] slots grouped by expert
    counts = (flat[:, None] == mx.arange(E)).sum(0)  # [E]
    padded = (counts + b - 1) // b * b
    shift = mx.cumsum(padded - counts) - (padded - counts)  # [E] padding before expert e's group
    sorted_rows = mx.arange(S) + shift[flat[order]]  # [S] row of the i-th slot in expert order
    dest = mx.zeros((S,), mx.int32).at[order].add(sorted_rows.astype(mx.int32))  # [S]
    row_slot = mx.full((R,), S, mx.int32).at[sorted_rows].add(order.astype(mx.int32) - S)
    ends = mx.cumsum(padded)  # [E] one past each expert's last row
    block_expert = mx.minimum((mx.arange(0, R, b)[:, None] >= ends).sum(-1), E - 1)  # [R/b]
    return dest.reshape(N, k), row_slot, block_expert.astype(mx.uint32), R


@mx.custom_function
def dispatch_rows(x: mx.array, dest: mx.array, row_token: mx.array) -> mx.array:
    """x [N, D] -> rows [R, D]: row r holds token row_token[r]. A padding row may hold any token:
    combine_rows never reads it and gives it a zero cotangent, so it adds nothing to any
    gradient. The gradient gathers each token's k rows (dest [N, k]) and sums them, where
    autodiff of the indexing would scatter-add (over ten times slower on MLX's CPU backend)."""
    return x[row_token]


@dispatch_rows.vjp
def _dispatch_rows_vjp(primals: list, cotangent: mx.array, output: mx.array) -> tuple:
    x, dest, row_token = primals
    return cotangent[dest].sum(1), mx.zeros_like(dest), mx.zeros_like(row_token)


@mx.custom_function
def combine_rows(rows: mx.array, dest: mx.array, row_slot: mx.array) -> mx.array:
    """rows [R, D] -> slots [N, k, D] (slot s reads row dest[s]). The gradient is the inverse
    gather: row r takes slot row_slot[r]'s cotangent (zero for padding rows, row_slot = S), so
    a padding row's weight gradients are zero whatever its input (see dispatch_rows)."""
    return rows[dest]


@combine_rows.vjp
def _combine_rows_vjp(primals: list, cotangent: mx.array, output: mx.array) -> tuple:
    rows, dest, row_slot = primals
    D = cotangent.shape[-1]
    g = mx.concatenate([cotangent.reshape(-1, D), mx.zeros((1, D), cotangent.dtype)])
    return g[row_slot], mx.zeros_like(dest), mx.zeros_like(row_slot)


class Experts(nn.Module):
    """Routed SwiGLU experts with stacked weights gate_proj/up_proj/down_proj [E, out, in].

    Two dispatches that compute the same function:
    - "dense": every expert on every token, combined with a [N, E] weight matrix (zero for
      unchosen experts). E/k times the FLOPs, but plain matmuls.
    - "gather": the N*k (token, expert) slots grouped by expert into blocks of `block` rows
      (each expert's group padded to a whole block), one mx.gather_mm per projection with one
      expert per block: k/E of the dense FLOPs plus at most (E-1)*(block-1) padding rows. Shapes
      are static (the padded row count depends only on N, k, E), so it compiles. block = 1
      is mlx-lm's one-row-per-slot dispatch, right for decoding a few tokens; bigger blocks
      turn the CPU's per-row matrix-vector products into real matrix products.
    The default, "gather", was measured faster (whole training steps, interleaved, CPU,
    float32): ~2.5x on the small preset (8 experts top-2), ~1.2x on the seed preset (2 experts
    top-1), equal on tiny (4 experts top-2). Assign `dispatch` to override.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, D, I = args.n_routed_experts, args.hidden_size, args.moe_intermediate_size
        self.gate_proj = StackedLinear(E, D, I)
        self.up_proj = StackedLinear(E, D, I)
        self.down_proj = StackedLinear(E, I, D)
        self.dispatch = "gather"
        self.max_block = 64  # rows per gather_mm block (fewer when the batch is small)

    def dense(self, x: mx.array, weights: mx.array, indices: mx.array) -> mx.array:
        """x [N, D], weights/indices [N, k] -> [N, D]."""
        E, I, D = self.gate_proj.weight.shape
        N = x.shape[0]
        combine = (mx.expand_dims(indices, -1) == mx.arange(E)).astype(x.dtype)  # [N, k, E]
        combine = (combine * weights[..., None].astype(x.dtype)).sum(1)  # [N, E]
        # All experts side by side: one [N, D] x [D, E*I] product each for gate and up; the
        # combine weights scale h before the down projection, whose [E*I, D] product then sums
        # over experts itself (sum_e c_e (h_e W_e) = (c h) W: no [E, N, D] intermediate).
        g = x @ self.gate_proj.weight.reshape(E * I, D).T  # [N, E*I]
        u = x @ self.up_proj.weight.reshape(E * I, D).T
        h = swiglu(g, u).reshape(N, E, I) * combine[..., None]  # [N, E, I]
        return h.reshape(N, E * I) @ self.down_proj.weight.swapaxes(-1, -2).reshape(E * I, D)

    def block_size(self, slots: int) -> int:
        """Rows per block for `slots` (token, expert) pairs: the largest power of two <=
        max_block that keeps the worst-case padding E*(block-1) under an eighth of the slots
        (the padded rows are always computed: the row count is static)."""
        E = self.gate_proj.weight.shape[0]
        b = 1
        while 2 * b <= self.max_block and E * (2 * b - 1) * 8 <= slots:
            b *= 2
        return b

    def gather(self, x: mx.array, weights: mx.array, indices: mx.array) -> mx.array:
        """Group the N*k slots by expert into blocks, gather_mm per block, gather back, combine."""
        N, k = indices.shape
        E = self.gate_proj.weight.shape[0]
        S = N * k
        b = self.block_size(S)
        if b == 1:  # few tokens (decoding): one row per slot, no grouping, as mlx-lm does
            y = self.mlp(mx.expand_dims(x, (-2, -3)), indices).squeeze(-2)  # [N, k, D]
            return (y * weights[..., None].astype(y.dtype)).sum(1)
        dest, row_slot, block_expert, R = block_layout(indices, E, b)
        xs = dispatch_rows(x, dest, mx.minimum(row_slot // k, N - 1))  # [R, D]; padding: any
        rows = self.mlp(xs.reshape(R // b, b, -1), block_expert, sorted_indices=True)
        y = combine_rows(rows.reshape(R, -1), dest, row_slot)  # [N, k, D]
        return (y * weights[..., None].astype(y.dtype)).sum(1)

    def mlp(self, xs: mx.array, experts: mx.array, sorted_indices: bool = False) -> mx.array:
        """Each matrix of rows through its expert's SwiGLU, one gather_mm per projection:
        xs [..., rows, D], experts [...] (the batch shapes broadcast) -> [..., rows, D].
        Blocks: xs [R/b, b, D], sorted experts [R/b]. One row per slot: xs [N, 1, 1, D],
        experts [N, k] -> [N, k, 1, D]."""

        def mm(a: mx.array, proj: nn.Module) -> mx.array:
            return proj.gather(a, experts, sorted_indices=sorted_indices)

        return mm(swiglu(mm(xs, self.gate_proj), mm(xs, self.up_proj)), self.down_proj)

    def __call__(self, x: mx.array, weights: mx.array, indices: mx.array) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights = weights.reshape(x.shape[0], -1)
        indices = indices.reshape(x.shape[0], -1)
        # MLX's CPU gather_mm is float32-only: other dtypes on the CPU take the dense path.
        cpu_half = x.dtype != mx.float32 and mx.default_device() != mx.gpu
        quantized = isinstance(self.gate_proj, QuantizedStackedLinear)  # gather_qmm only
        dense = (self.dispatch == "dense" or cpu_half) and not quantized
        fn = self.dense if dense else self.gather
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
            self.shared_experts = MLP(
                args.hidden_size, args.moe_intermediate_size * args.n_shared_experts
            )

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
