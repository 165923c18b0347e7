"""Training losses and the bias update of the PyTorch twin; mirrors `mlx_model/loss.py`.

Total = CE + alpha * balance + lambda / D * sum_k CE_k(MTP), with the same fields as the MLX
`LossTerms`. Also `make_optimizer`: AdamW (0.9, 0.95) with weight decay on matrices only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mlx_model.config import ModelArgs

from .model import Model, MoE, Routing


class LossTerms(NamedTuple):
    total: torch.Tensor  # [] what is differentiated
    ce: torch.Tensor  # [] mean next-token cross-entropy
    balance: torch.Tensor  # [] sequence-wise balance loss (before alpha), summed over MoE layers
    mtp: torch.Tensor  # [] mean over depths of the MTP cross-entropies (before lambda)
    counts: torch.Tensor  # [n_moe_layers, E] tokens routed to each expert (main layers, then MTP)
    dropped: torch.Tensor  # [] (token, expert) slots dropped by the capacity factor


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE over all positions; logits [B, T, V], targets [B, T] (at least float32 math)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def balance_loss(routing: list[Routing], args: ModelArgs) -> torch.Tensor:
    """sum over MoE layers of mean over sequences of sum_i f_i * P_i, with
    f_i = E / (k T) * (tokens of the sequence choosing i), P_i = mean_t s_i / sum_j s_j."""
    E, k = args.n_routed_experts, args.num_experts_per_tok
    total = routing[0].scores.new_zeros(())
    for r in routing:
        B, T, _ = r.scores.shape
        chosen = F.one_hot(r.indices, E).sum(2)  # [B, T, E]
        f = chosen.sum(1).to(r.scores.dtype) * (E / (k * T))  # [B, E]; integer counts: no grad
        p = (r.scores / r.scores.sum(-1, keepdim=True)).mean(1)  # [B, E]
        total = total + (f * p).sum(-1).mean()
    return total


def loss_terms(model: Model, inputs: torch.Tensor, targets: torch.Tensor) -> LossTerms:
    """inputs, targets [B, T] -> all loss terms for one (micro-)batch."""
    args = model.args
    logits, hidden, routing = model(inputs)
    ce = cross_entropy(logits, targets)
    mtp = ce.new_zeros(())
    if args.num_nextn_predict_layers > 0:
        mtp_logits, mtp_routing = model.mtp_forward(hidden, inputs)
        routing = routing + mtp_routing
        mtp = sum(cross_entropy(lg, targets[:, k:]) for k, lg in enumerate(mtp_logits, start=1))
        mtp = mtp / args.num_nextn_predict_layers
    total = ce + args.mtp_loss_weight * mtp
    if routing:
        bal = balance_loss(routing, args)
        total = total + args.balance_loss_alpha * bal
        counts = torch.stack([r.counts for r in routing])
        dropped = sum(r.dropped for r in routing)
    else:
        bal, counts, dropped = (
            ce.new_zeros(()),
            torch.zeros((0, 0), dtype=torch.int64),
            torch.tensor(0),
        )
    return LossTerms(total, ce, bal, mtp, counts, dropped)


def moe_layers(model: Model) -> list[MoE]:
    """MoE layers in the order loss_terms reports their counts: main layers, then MTP blocks."""
    blocks = list(model.model.layers) + [m.block for m in getattr(model, "mtp", [])]
    return [b.mlp for b in blocks if isinstance(b.mlp, MoE)]


@torch.no_grad()
def update_bias(model: Model, counts: torch.Tensor) -> None:
    """b_i += gamma * sign(mean - c_i) (rule sign) or gamma * (mean - c_i) / mean (rule
    relative) per MoE layer, with c the step's counts [n_moe_layers, E]."""
    gamma = model.args.bias_update_speed
    if gamma == 0:
        return
    c = counts.to(torch.float64)
    mean = c.mean(-1, keepdim=True)
    if model.args.bias_update_rule == "relative":  # gamma * relative load error
        delta = gamma * (mean - c) / mean.clamp_min(1e-9)
    else:  # the sign rule (DeepSeek-V3)
        delta = gamma * torch.sign(mean - c)
    for layer, d in zip(moe_layers(model), delta):
        bias = layer.gate.e_score_correction_bias
        bias.add_(d.to(bias.device, bias.dtype))


def make_optimizer(
    model: Model, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8
):
    """torch.optim.AdamW with two groups: decay on ndim >= 2 parameters, none on norms/biases.
    The routing bias is a buffer, so it never reaches the optimizer."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
