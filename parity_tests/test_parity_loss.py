"""Loss terms (CE, sequence-wise balance, MTP, total), gradients of the total w.r.t. every
trainable parameter, and full optimizer steps (AdamW + clipping + bias update).

Tolerances: TOL_LOGITS (1e-4 relative) for the loss terms and parameters after the steps,
TOL_GRAD (1e-4 relative) for each parameter's gradient, 1e-3 for the parameter updates.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import torch_reference.loss as tl
from conftest import (
    TOL_GRAD,
    TOL_LOGITS,
    assert_close,
    mqa_args,
    random_bias,
    set_bias,
    tiny_args,
    to_np,
    twins,
)
from mlx_model.config import BIAS_UPDATE_RULES
from mlx_model.loss import loss_terms, moe_layers, update_bias
from mlx_model.optim import clip_by_global_norm, lr_at, make_optimizer

CONFIGS = {
    # MLA with q_lora, sigmoid top-2 with groups, MTP depth 2.
    "mla-mtp": lambda: tiny_args(
        q_lora_rank=24,
        n_routed_experts=8,
        n_group=4,
        topk_group=2,
        num_nextn_predict_layers=2,
        balance_loss_alpha=0.01,
    ),
    # The seed's kinds: MQA, LayerNorm, softmax top-1, capacity 1.25 (training mode), MTP 1.
    "mqa-capacity": lambda: mqa_args(num_nextn_predict_layers=1, balance_loss_alpha=0.01),
    # No MTP: the only config where one-token sequences make sense.
    "mla-plain": lambda: tiny_args(num_hidden_layers=3),
}
CASES = [
    (c, B, T) for c in CONFIGS for B, T in [(1, 1), (2, 9), (3, 16)] if T > 1 or c == "mla-plain"
]
STEP_CASES = [("mla-mtp", 2, 9), ("mqa-capacity", 3, 16), ("mla-plain", 1, 5)]


def setup(config: str, seed: int, B: int, T: int, **overrides):
    """Twins in training mode with the same non-zero routing biases; tokens [B, T+1]."""
    args = CONFIGS[config]().replace(**overrides)
    mlx, ref = twins(args, training=True)
    rng = np.random.default_rng(seed)
    for moe, moe_t in zip(moe_layers(mlx), tl.moe_layers(ref)):
        set_bias(moe, moe_t, random_bias(rng, args.n_routed_experts, 0.05))
    tokens = rng.integers(0, args.vocab_size, size=(B, T + 1))
    return args, mlx, ref, tokens[:, :-1], tokens[:, 1:]


def numpy_ce(logits: np.ndarray, targets: np.ndarray) -> float:
    """Independent mean cross-entropy in float64."""
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, targets[..., None], -1).mean())


@pytest.mark.parametrize("config,B,T", CASES)
def test_loss_terms(seed, config, B, T):
    args, mlx, ref, inputs, targets = setup(config, seed, B, T)
    got = loss_terms(mlx, mx.array(inputs), mx.array(targets))
    want = tl.loss_terms(ref, torch.from_numpy(inputs), torch.from_numpy(targets))
    assert (to_np(got.counts) == to_np(want.counts)).all(), "routing differs (expert counts)"
    assert int(got.dropped) == int(want.dropped)
    for name in ("ce", "balance", "mtp", "total"):
        assert_close(getattr(got, name), getattr(want, name), TOL_LOGITS, name)
    logits = to_np(mlx(mx.array(inputs)))
    assert_close(
        numpy_ce(logits, targets), want.ce, TOL_LOGITS, "numpy CE of MLX logits vs twin CE"
    )
    assert_close(got.ce, numpy_ce(logits, targets), 1e-6, "MLX CE vs numpy CE of the same logits")
    assert float(got.total) > 0 and float(got.ce) > 0


@pytest.mark.parametrize("config,B,T", CASES)
def test_gradients(seed, config, B, T):
    args, mlx, ref, inputs, targets = setup(config, seed, B, T)
    loss, grads = nn.value_and_grad(mlx, lambda i, t: loss_terms(mlx, i, t).total)(
        mx.array(inputs), mx.array(targets)
    )
    grads = dict(tree_flatten(grads))
    terms = tl.loss_terms(ref, torch.from_numpy(inputs), torch.from_numpy(targets))
    terms.total.backward()
    grads_t = {k: p.grad for k, p in ref.named_parameters()}
    assert_close(loss, terms.total, TOL_LOGITS, "total loss")
    assert sorted(grads) == sorted(grads_t), "trainable parameter sets differ"
    assert not any("e_score_correction_bias" in k for k in grads), "the routing bias got a gradient"
    for k in sorted(grads):
        assert grads_t[k] is not None, f"{k}: no torch gradient"
        assert_close(grads[k], grads_t[k], TOL_GRAD, f"grad {k}")


def bias_move(counts: np.ndarray, gamma: float, rule: str) -> np.ndarray:
    """Independent float64 bias update of one step: the sign rule or the relative-error rule."""
    c = counts.astype(np.float64)
    mean = c.mean(-1, keepdims=True)
    return gamma * (np.sign(mean - c) if rule == "sign" else (mean - c) / mean)


@pytest.mark.parametrize("rule", BIAS_UPDATE_RULES)
@pytest.mark.parametrize("config,B,T", STEP_CASES)
def test_optimizer_steps(seed, config, B, T, rule):
    """Two steps: loss, grads, clip to 1.0, AdamW (decay on matrices only), bias update."""
    args, mlx, ref, inputs, targets = setup(config, seed, B, T, bias_update_rule=rule)
    lr, warmup, total, clip = 1e-3, 1, 10, 1.0
    before = {k: to_np(v) for k, v in tree_flatten(mlx.parameters())}
    opt = make_optimizer(lr, weight_decay=0.1)
    opt_t = tl.make_optimizer(ref, lr, weight_decay=0.1)
    step_fn = nn.value_and_grad(mlx, lambda i, t: loss_terms(mlx, i, t))
    layers = [
        k for k in sorted(before) if "e_score_correction_bias" in k
    ]  # as moe_layers orders them
    layers = sorted(
        layers,
        key=lambda k: (k.startswith("mtp."), [int(p) if p.isdigit() else p for p in k.split(".")]),
    )
    bias_moves = 0.0
    for step in range(2):
        # MLX
        (_, *_, counts, _), grads = step_fn(mx.array(inputs), mx.array(targets))
        grads, norm = clip_by_global_norm(grads, clip)
        opt.learning_rate = lr_at(step, lr, warmup, total)
        opt.update(mlx, grads)
        update_bias(mlx, counts)
        mx.eval(mlx.parameters(), opt.state)
        # torch
        opt_t.zero_grad()
        terms = tl.loss_terms(ref, torch.from_numpy(inputs), torch.from_numpy(targets))
        terms.total.backward()
        norm_t = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        for group in opt_t.param_groups:
            group["lr"] = lr_at(step, lr, warmup, total)
        opt_t.step()
        tl.update_bias(ref, terms.counts)
        assert (to_np(counts) == to_np(terms.counts)).all(), f"step {step}: routing differs"
        bias_moves = bias_moves + bias_move(to_np(counts), args.bias_update_speed, rule)
        assert_close(norm, norm_t, TOL_LOGITS, f"step {step}: gradient norm")
        assert float(norm_t) > clip, "clipping inactive: the test would not check it"
    after = dict(tree_flatten(mlx.parameters()))
    state_t = ref.state_dict()
    assert sorted(after) == sorted(state_t)
    for k in sorted(after):
        if "e_score_correction_bias" in k:  # moved by the rule only: no gradient, no decay
            want = before[k] + bias_moves[layers.index(k)]
            assert np.abs(to_np(after[k]) - want).max() < 1e-8, f"{k}: {to_np(after[k])} != {want}"
            assert np.abs(to_np(state_t[k]) - want).max() < 1e-8, (
                f"{k}: {to_np(state_t[k])} != {want}"
            )
            continue
        assert_close(after[k], state_t[k], TOL_LOGITS, f"param {k}")
    # The updates themselves (parameters minus their start), all parameters together.
    delta = np.concatenate([(to_np(after[k]) - before[k]).ravel() for k in sorted(after)])
    delta_t = np.concatenate([(to_np(state_t[k]) - before[k]).ravel() for k in sorted(after)])
    assert_close(delta, delta_t, 1e-3, "parameter updates")
