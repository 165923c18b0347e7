"""Training losses (SPEC section 6): next-token cross-entropy, the sequence-wise balance loss,
multi-token prediction; and the auxiliary-loss-free bias update. The model itself returns logits.

Total = CE + alpha * balance + lambda / D * sum_k CE_k(MTP). CE is always >= 0 and is reported
apart from the balance and MTP terms.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import mlx.core as mx

from .config import ModelArgs
from .model import Model
from .moe import MoE, Routing


class LossTerms(NamedTuple):
    total: mx.array  # [] what is differentiated
    ce: mx.array  # [] mean next-token cross-entropy
    balance: mx.array  # [] sequence-wise balance loss (before alpha), summed over MoE layers
    mtp: mx.array  # [] mean over depths of the MTP cross-entropies (before lambda)
    counts: mx.array  # [n_moe_layers, E] tokens routed to each expert (main layers, then MTP)
    dropped: mx.array  # [] (token, expert) slots dropped by the capacity factor


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean CE over all positions; logits [B, T, V], targets [B, T] (float32 math).

    logsumexp written out (max, exp, sum) rather than nn.losses.cross_entropy: the same
    numbers, but under mx.compile the exp fuses into one elementwise kernel whose output the
    backward pass reuses, where the logsumexp primitive's backward runs a second softmax over
    [B, T, V]: ~4x faster on the CPU backend. The max gets no gradient (lse does not depend on it).
    """
    x = logits.astype(mx.float32)
    m = mx.stop_gradient(x.max(-1, keepdims=True))  # [B, T, 1]
    lse = mx.log(mx.exp(x - m).sum(-1)) + m[..., 0]  # [B, T]
    return (lse - mx.take_along_axis(x, targets[..., None], -1)[..., 0]).mean()


def summed_cross_entropy(model: Model, batches: Iterable) -> tuple[mx.array, int]:
    """(sum of per-token CE, token count) over [B, T+1] batches, model in eval mode
    (capacity dropping off); the caller divides, after any reduction across ranks."""
    model.eval()
    total, n = mx.array(0.0), 0
    for b in batches:
        b = mx.array(b)
        total = total + cross_entropy(model(b[:, :-1]), b[:, 1:]) * b[:, 1:].size
        mx.eval(total)  # one batch's activations at a time, however many batches
        n += b[:, 1:].size
    return total, n


def balance_loss(routing: list[Routing], args: ModelArgs) -> mx.array:
    """sum over MoE layers of mean over sequences of sum_i f_i * P_i, where
    f_i = E / (k T) * (tokens of the sequence choosing i) and P_i = mean_t s_i / sum_j s_j."""
    E, k = args.n_routed_experts, args.num_experts_per_tok
    total = mx.array(0.0)
    for r in routing:
        B, T, _ = r.scores.shape
        chosen = (mx.expand_dims(r.indices, -1) == mx.arange(E)).sum(2)  # [B, T, E]
        f = mx.stop_gradient(chosen.sum(1).astype(mx.float32) * (E / (k * T)))  # [B, E]
        p = (r.scores / r.scores.sum(-1, keepdims=True)).mean(1)  # [B, E]
        total = total + (f * p).sum(-1).mean()
    return total


def loss_terms(model: Model, inputs: mx.array, targets: mx.array) -> LossTerms:
    """inputs, targets [B, T] -> all loss terms for one (micro-)batch."""
    args = model.args
    logits, hidden, routing = model.forward(inputs)
    ce = cross_entropy(logits, targets)
    mtp = mx.array(0.0)
    if args.num_nextn_predict_layers > 0:
        mtp_logits, mtp_routing = model.mtp_forward(hidden, inputs)
        routing = routing + mtp_routing
        mtp = sum(cross_entropy(lg, targets[:, k:]) for k, lg in enumerate(mtp_logits, start=1))
        mtp = mtp / args.num_nextn_predict_layers
    total = ce + args.mtp_loss_weight * mtp
    if routing:
        bal = balance_loss(routing, args)
        total = total + args.balance_loss_alpha * bal
        counts = mx.stack([r.counts for r in routing])
        dropped = sum(r.dropped for r in routing)
    else:
        bal, counts, dropped = mx.array(0.0), mx.zeros((0, 0), mx.int32), mx.array(0)
    return LossTerms(total, ce, bal, mtp, counts, dropped)


def moe_layers(model: Model) -> list[MoE]:
    """MoE layers in the order loss_terms reports their counts: main layers, then MTP blocks."""
    blocks = list(model.model.layers) + [m.block for m in getattr(model, "mtp", [])]
    return [b.mlp for b in blocks if isinstance(b.mlp, MoE)]


def bias_delta(counts: mx.array, gamma: float, rule: str) -> mx.array:
    """The routing-bias move [n_moe_layers, E] for one step's summed counts (SPEC section 4).

    sign (DeepSeek-V3): gamma * sign(mean - c_i): every expert moves by gamma every step, also
    when the load is nearly even, so a gamma fast enough for a short run keeps the routing
    jittering. relative: gamma * (mean - c_i) / mean: the move shrinks with the load error, fast
    for a badly overloaded expert, quiet near balance."""
    c = counts.astype(mx.float32)
    mean = c.mean(-1, keepdims=True)
    if rule == "relative":
        return gamma * (mean - c) / mx.maximum(mean, 1e-9)
    return gamma * mx.sign(mean - c)


def update_bias(model: Model, counts: mx.array) -> None:
    """Auxiliary-loss-free balancing, once per optimizer step: b += bias_delta(c), with c the
    step's summed counts [n_moe_layers, E] (all micro-batches and processes)."""
    gamma = model.args.bias_update_speed
    if gamma == 0:
        return
    delta = bias_delta(counts, gamma, model.args.bias_update_rule)
    for layer, d in zip(moe_layers(model), delta):
        layer.gate.e_score_correction_bias = layer.gate.e_score_correction_bias + d
