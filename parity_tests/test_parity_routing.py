"""DeepSeekMoE routing and expert math: chosen experts and weights (sigmoid/softmax, routing
bias, group-limited top-k), capacity dropping, the Experts on fixed routes, the MoE layer.

Inputs are drawn without near-ties: rows whose selection margin on s + b (or on the group
scores) is below 1e-3 are redrawn, so float32 vs float64 cannot flip a choice.
Tolerance TOL_LAYER (1e-5 relative); indices, counts and drop decisions must be equal.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch

import torch_reference.model as tm
from conftest import (
    TOL_LAYER,
    assert_close,
    mqa_args,
    random_bias,
    set_bias,
    tiny_args,
    to_mx,
    to_np,
    to_torch,
    twins,
)
from mlx_model.moe import capacity_keep, select_experts

MARGIN = 1e-3
SHAPES = [(1, 1), (2, 5), (3, 16)]
ROUTERS = {
    "sigmoid": lambda **kw: tiny_args(**kw),
    "softmax": lambda **kw: tiny_args(scoring_func="softmax", **kw),
    "grouped": lambda **kw: tiny_args(n_routed_experts=8, n_group=4, topk_group=2, **kw),
    "softmax-top1": lambda **kw: mqa_args(**kw),
}


def margins(logits: np.ndarray, bias: np.ndarray, args) -> np.ndarray:
    """Smallest gap [...] that decides the routing of each row (float64, numpy, independent)."""
    if args.scoring_func == "sigmoid":
        s = 1 / (1 + np.exp(-logits))
    else:
        e = np.exp(logits - logits.max(-1, keepdims=True))
        s = e / e.sum(-1, keepdims=True)
    choice = s + bias
    E, k, G, tg = args.n_routed_experts, args.num_experts_per_tok, args.n_group, args.topk_group
    gap = np.full(logits.shape[:-1], np.inf)
    if G > 1 and tg < G:
        grouped = choice.reshape(*choice.shape[:-1], G, E // G)
        group_score = np.sort(grouped, -1)[..., -2:].sum(-1)  # [..., G]
        gs = -np.sort(-group_score, -1)
        gap = np.minimum(gap, gs[..., tg - 1] - gs[..., tg])
        keep = group_score >= gs[..., tg - 1 : tg]
        choice = np.where(keep[..., None], grouped, -np.inf).reshape(choice.shape)
    c = -np.sort(-choice, -1)[..., : k + 1]  # best first; gaps between ranks 1..k+1 (order too)
    return np.minimum(gap, np.diff(-c, axis=-1).min(-1))


def draw_without_ties(rng, shape, to_logits, bias, args) -> np.ndarray:
    """Standard-normal rows x [..., n]; redraw rows whose routing margin is below MARGIN."""
    x = rng.standard_normal(shape)
    for _ in range(200):
        bad = margins(to_logits(x), bias, args) < MARGIN
        if not bad.any():
            return x
        x[bad] = rng.standard_normal((int(bad.sum()), shape[-1]))
    raise RuntimeError("could not draw inputs without near-ties")


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("biased", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("B,T", SHAPES)
def test_select_experts(seed, router, biased, B, T):
    args = ROUTERS[router]()
    E = args.n_routed_experts
    rng = np.random.default_rng(seed)
    # A bias comparable to the score gaps, so that it changes choices (checked below).
    scale = 0.3 if args.scoring_func == "sigmoid" else 0.1
    bias = random_bias(rng, E, scale) if biased else np.zeros(E, np.float32)
    logits = draw_without_ties(rng, (B, T, E), lambda x: x * 2, bias, args) * 2
    w, idx, s = select_experts(to_mx(logits), mx.array(bias), args)
    w_t, idx_t, s_t = tm.select_experts(to_torch(logits), torch.from_numpy(bias).double(), args)
    assert (to_np(idx) == to_np(idx_t)).all(), (
        f"chosen experts differ:\n{to_np(idx)}\n{to_np(idx_t)}"
    )
    assert_close(w, w_t, TOL_LAYER, "routing weights")
    assert_close(s, s_t, TOL_LAYER, "scores")
    if biased:  # the bias must matter for selection, and only for selection
        _, idx0, _ = tm.select_experts(to_torch(logits), torch.zeros(E, dtype=torch.float64), args)
        if B * T >= 16:
            assert (idx0 != idx_t).any(), (
                "the bias changed no choice: the test would not see a bias bug"
            )
        s_chosen = np.take_along_axis(to_np(s_t), to_np(idx_t), -1)
        want = s_chosen / s_chosen.sum(-1, keepdims=True) if args.norm_topk_prob else s_chosen
        assert_close(w_t, want * args.routed_scaling_factor, 1e-12, "weights from unbiased s")


def capacity_reference(indices: np.ndarray, E: int, cf: float) -> np.ndarray:
    """Plain loops: per sequence, walk tokens in order (then top-k rank), fill expert queues."""
    B, T, k = indices.shape
    cap = math.ceil(cf * k * T / E)
    keep = np.zeros(indices.shape, bool)
    for b in range(B):
        used = [0] * E
        for t in range(T):
            for j in range(k):
                e = indices[b, t, j]
                keep[b, t, j] = used[e] < cap
                used[e] += 1
    return keep


@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25])
@pytest.mark.parametrize("E,k", [(4, 2), (2, 1), (8, 2)])
@pytest.mark.parametrize("B,T", SHAPES)
def test_capacity_keep(seed, cf, E, k, B, T):
    rng = np.random.default_rng(seed)
    # Skewed choices (distinct experts per token) so that some experts overflow.
    p = rng.dirichlet(np.ones(E) * 0.5)
    indices = np.stack([[rng.choice(E, k, replace=False, p=p) for _ in range(T)] for _ in range(B)])
    want = capacity_reference(indices, E, cf)
    got = to_np(capacity_keep(mx.array(indices), E, cf))
    got_t = to_np(tm.capacity_keep(torch.from_numpy(indices), E, cf))
    assert (got == want).all() and (got_t == want).all(), (
        f"kept slots differ:\n{got}\n{got_t}\n{want}"
    )


@pytest.mark.parametrize("dispatch", ["dense", "gather"])
@pytest.mark.parametrize("B,T", SHAPES + [(4, 32)])  # 128 tokens: gather runs blocks of > 1 row
def test_experts_on_fixed_routes(seed, dispatch, B, T):
    """Routing apart from expert math: the same indices and weights fed to both Experts."""
    args = tiny_args(n_routed_experts=8, num_experts_per_tok=3)
    mlx, ref = twins(args)
    rng = np.random.default_rng(seed)
    N, E, k = B * T, args.n_routed_experts, args.num_experts_per_tok
    x = rng.standard_normal((N, args.hidden_size))
    indices = np.stack([rng.choice(E, k, replace=False) for _ in range(N)])
    weights = rng.random((N, k))
    experts = mlx.model.layers[1].mlp.experts
    experts.dispatch = dispatch
    got = experts(to_mx(x), to_mx(weights), mx.array(indices))
    want = ref.model.layers[1].mlp.experts(
        to_torch(x), to_torch(weights), torch.from_numpy(indices)
    )
    assert_close(got, want, TOL_LAYER, f"experts ({dispatch})")


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("dispatch", ["dense", "gather"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("B,T", SHAPES)
def test_moe_layer(seed, router, dispatch, training, B, T):
    """The whole MoE layer (gate with a non-zero bias, routed + shared experts; capacity
    dropping in training mode) on x [B, T, D]."""
    args = ROUTERS[router](capacity_factor=1.0)
    mlx, ref = twins(args, training=training)
    moe, moe_t = mlx.model.layers[1].mlp, ref.model.layers[1].mlp
    rng = np.random.default_rng(seed)
    bias = random_bias(rng, args.n_routed_experts, 0.05)
    set_bias(moe, moe_t, bias)
    moe.experts.dispatch = dispatch
    w_gate = to_np(moe_t.gate.weight)
    x = draw_without_ties(rng, (B, T, args.hidden_size), lambda x: x @ w_gate.T, bias, args)
    y, r = moe.route(to_mx(x))
    y_t, r_t = moe_t.route(to_torch(x))
    assert (to_np(r.indices) == to_np(r_t.indices)).all(), "chosen experts differ"
    assert (to_np(r.counts) == to_np(r_t.counts)).all()
    assert int(r.dropped) == int(r_t.dropped)
    if training and T == 16:
        assert int(r.dropped) > 0, "capacity 1.0 dropped nothing: choose inputs that overflow"
    if not training:
        assert int(r.dropped) == 0
    assert_close(r.scores, r_t.scores, TOL_LAYER, "scores")
    assert_close(y, y_t, TOL_LAYER, f"MoE output ({router}, {dispatch})")
