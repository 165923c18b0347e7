"""Group-limited routing follows the official rule: masked groups get -inf, not 0.

DeepSeek-V3's inference code (inference/model.py, Gate.forward) and transformers 5.24 fill the
experts of dropped groups with -inf before the top-k, so only experts of kept groups can be
chosen; filling 0 (mlx-lm, older transformers) lets a dropped expert win whenever fewer than k
kept experts have s + b > 0, which strongly negative correction biases cause. The reference here
is that rule written out in float64 NumPy from the official algorithm; both twins must match it,
and each test checks that the 0-fill rule would have failed it.
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
    set_bias,
    tiny_args,
    to_mx,
    to_np,
    to_torch,
    twins,
)
from mlx_model.moe import select_experts

MARGIN = 1e-3  # rows whose deciding gap is smaller are redrawn (float32 vs float64 flips)
# (experts, groups, groups kept): group sizes 2 and 4; k = 2
GROUPINGS = [(8, 4, 1), (8, 2, 1), (8, 4, 2)]


def official_route(logits: np.ndarray, bias: np.ndarray, args, fill: float = -np.inf):
    """float64 (indices [..., k] best first, weights [..., k], smallest deciding gap [...]).

    Sigmoid scores s; group score = sum of the group's two largest s + b; keep the topk_group
    best groups; experts of the other groups get `fill`; top-k of the result; weights are the
    chosen unbiased s, normalised if norm_topk_prob, times routed_scaling_factor.
    """
    E, k, G, tg = args.n_routed_experts, args.num_experts_per_tok, args.n_group, args.topk_group
    s = 1.0 / (1.0 + np.exp(-logits))
    c = (s + bias).reshape(*logits.shape[:-1], G, E // G)
    group_score = np.sort(c, -1)[..., -2:].sum(-1)  # [..., G]
    order = np.argsort(-group_score, -1)
    ranked = np.take_along_axis(group_score, order, -1)
    dropped = np.ones(group_score.shape, bool)
    np.put_along_axis(dropped, order[..., :tg], False, -1)
    c = np.where(dropped[..., None], fill, c).reshape(logits.shape)
    idx = np.argsort(-c, -1)[..., :k]
    best = np.take_along_axis(c, np.argsort(-c, -1)[..., : k + 1], -1)
    with np.errstate(invalid="ignore"):
        gaps = -np.diff(best, axis=-1)  # inf where a -inf follows a finite value
    gap = np.minimum(np.nan_to_num(gaps, nan=np.inf).min(-1), ranked[..., tg - 1] - ranked[..., tg])
    w = np.take_along_axis(s, idx, -1)
    if args.norm_topk_prob:
        w = w / w.sum(-1, keepdims=True)
    return idx, w * args.routed_scaling_factor, gap


def negative_bias(rng: np.random.Generator, E: int) -> np.ndarray:
    """Strongly negative, distinct per expert: s + b < 0 for every expert (s is in (0, 1))."""
    return (-1.5 - 0.5 * rng.random(E)).astype(np.float32)


def draw(rng, shape, bias, args) -> np.ndarray:
    x = rng.standard_normal(shape) * 2
    for _ in range(200):
        bad = official_route(x, bias.astype(np.float64), args)[2] < MARGIN
        if not bad.any():
            return x
        x[bad] = rng.standard_normal((int(bad.sum()), shape[-1])) * 2
    raise RuntimeError("could not draw inputs without near-ties")


@pytest.mark.parametrize("E,G,tg", GROUPINGS)
@pytest.mark.parametrize("B,T", [(1, 1), (2, 7), (3, 16)])
def test_select_experts_negative_bias(seed, E, G, tg, B, T):
    args = tiny_args(n_routed_experts=E, n_group=G, topk_group=tg)
    rng = np.random.default_rng(seed)
    bias = negative_bias(rng, E)
    logits = draw(rng, (B, T, E), bias, args)
    b64 = bias.astype(np.float64)
    want_idx, want_w, _ = official_route(logits, b64, args)
    w, idx, _ = select_experts(to_mx(logits), mx.array(bias), args)
    w_t, idx_t, _ = tm.select_experts(to_torch(logits), torch.from_numpy(b64), args)
    for name, got in (("MLX", to_np(idx)), ("twin", to_np(idx_t))):
        assert (got == want_idx).all(), f"{name} chose other experts:\n{got}\nofficial:\n{want_idx}"
    assert_close(w, want_w, TOL_LAYER, "MLX weights")
    assert_close(w_t, want_w, 1e-12, "twin weights")
    # Every chosen expert lies in a kept group; and the 0-fill rule would choose differently.
    zero_idx = official_route(logits, b64, args, fill=0.0)[0]
    assert (np.sort(zero_idx, -1) != np.sort(want_idx, -1)).any(), "0-fill would pass this test"


@pytest.mark.parametrize("E,G,tg", GROUPINGS[:2])  # one group kept
def test_model_logits_negative_bias(seed, E, G, tg):
    """Whole models (MLX float32 vs twin float64) with strongly negative biases in every MoE
    layer: logits and the chosen experts agree, and no chosen expert is in a dropped group."""
    args = tiny_args(n_routed_experts=E, n_group=G, topk_group=tg, num_hidden_layers=3)
    mlx, ref = twins(args)
    rng = np.random.default_rng(seed)
    layers = list(zip(mlx.model.layers, ref.model.layers))[args.first_k_dense_replace :]
    for m, r in layers:
        set_bias(m.mlp, r.mlp, negative_bias(rng, E))
    ids = rng.integers(0, args.vocab_size, (2, 12))
    logits, _, routing = mlx.forward(mx.array(ids))
    with torch.no_grad():
        logits_t, _, routing_t = ref(torch.from_numpy(ids))
    assert_close(logits, logits_t, TOL_LOGITS, "logits, negative biases + groups")
    assert len(routing) == len(routing_t) == len(layers)
    for ro, ro_t in zip(routing, routing_t):
        idx = to_np(ro.indices)
        assert (idx == to_np(ro_t.indices)).all()
        group = idx // (E // G)  # [B, T, k]; one group kept (tg = 1): all k from it
        assert (group == group[..., :1]).all(), "an expert of a dropped group was chosen"
