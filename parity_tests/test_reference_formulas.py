"""Independent float64 NumPy references, written from SPEC sections 5-6, for the formulas both
twins share: the sequence-wise balance loss, the MTP loss (and how the total assembles), and the
learning-rate schedules. The MLX code and the torch twin are each compared with them, so a
mistake the two twins share cannot pass.

Conventions the SPEC leaves open, fixed here and documented in the code's docstrings: the balance
loss is averaged over the sequences of a batch and summed over MoE layers; f counts a token's
experts before capacity dropping; MTP depth k at position i predicts token t_{i+k+1}; the lr of
optimizer step s (0-based) ramps to the peak at the last warmup step and reaches lr * min_lr_ratio
at the last step (max_steps - 1), then stays there.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch

import torch_reference.loss as tl
import torch_reference.model as tm
from conftest import assert_close, random_bias, set_bias, tiny_args, to_np, twins
from mlx_model import moe as mm
from mlx_model.loss import balance_loss, loss_terms, moe_layers
from mlx_model.optim import lr_at, make_optimizer, make_schedule


# ------------------------------------------------------------------------ references
def ref_balance(scores: list, indices: list, E: int, k: int) -> float:
    """sum over layers, mean over sequences, of sum_i f_i P_i (SPEC 4): plain loops, float64.
    f_i = E / (k T) * (tokens of the sequence choosing i); P_i = mean_t s_ti / sum_j s_tj."""
    total = 0.0
    for s, idx in zip(scores, indices):  # one MoE layer: s [B, T, E], idx [B, T, k]
        B, T, _ = s.shape
        per_seq = []
        for b in range(B):
            count = np.zeros(E)
            for t in range(T):
                for e in idx[b, t]:
                    count[e] += 1
            f = E / (k * T) * count
            P = np.mean([s[b, t] / s[b, t].sum() for t in range(T)], axis=0)
            per_seq.append(float(f @ P))
        total += sum(per_seq) / B
    return total


def ref_ce(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean over positions of -log softmax(logits)[target], float64."""
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return float((lse - np.take_along_axis(z, targets[..., None], -1)[..., 0]).mean())


def ref_mtp(mtp_logits: list, tokens: np.ndarray) -> float:
    """(1 / D) sum_k CE_k (SPEC 5): depth k sees inputs t_0..t_{T-1} and, at position i < T - k,
    predicts t_{i+k+1}; tokens [B, T + 1]."""
    T = tokens.shape[1] - 1
    ces = [ref_ce(lg, tokens[:, k + 1 : T + 1]) for k, lg in enumerate(mtp_logits, start=1)]
    return sum(ces) / len(ces)


def ref_lr(steps: np.ndarray, lr, warmup, total, kind, min_ratio=0.1, decay_fraction=0.2):
    """Warmup (linear, peak at step warmup - 1), then cosine / warmup-stable-decay / constant;
    cosine and wsd end at lr * min_ratio at step total - 1 and stay there (SPEC 6)."""
    s = steps.astype(np.float64)
    lo = lr * min_ratio
    if kind == "constant":
        after = np.full_like(s, lr)
    elif kind == "cosine":
        progress = np.clip((s - (warmup - 1)) / (total - warmup), 0.0, 1.0)
        after = lo + (lr - lo) * 0.5 * (1.0 + np.cos(np.pi * progress))
    else:  # wsd: flat, then a straight line down over the last decay_fraction of all steps
        n_decay = max(1, round(decay_fraction * total))
        first = total - n_decay  # first decaying step
        after = lr - (lr - lo) * np.clip((s - first + 1) / n_decay, 0.0, 1.0)
    ramp = lr * (s + 1) / max(warmup, 1)
    return np.where(s < warmup, ramp, after)


# ------------------------------------------------------------------------ balance loss
@pytest.mark.parametrize("E,k,B,T,layers", [(4, 2, 1, 1, 1), (8, 2, 3, 7, 2), (6, 3, 2, 16, 3)])
def test_balance_loss_matches_reference(seed, E, k, B, T, layers):
    """Random positive scores and distinct random experts, fed to both twins' balance_loss."""
    rng = np.random.default_rng(seed)
    args = tiny_args(n_routed_experts=E, num_experts_per_tok=k, n_group=1, topk_group=1)
    scores = [rng.random((B, T, E)) + 0.01 for _ in range(layers)]
    indices = [np.argsort(rng.random((B, T, E)), -1)[..., :k] for _ in range(layers)]
    want = ref_balance(scores, indices, E, k)
    zero = np.zeros(E, np.int64)
    got = balance_loss(
        [
            mm.Routing(mx.array(s.astype(np.float32)), mx.array(i), mx.array(zero), mx.array(0))
            for s, i in zip(scores, indices)
        ],
        args,
    )
    got_t = tl.balance_loss(
        [
            tm.Routing(
                torch.from_numpy(s), torch.from_numpy(i), torch.from_numpy(zero), torch.tensor(0)
            )
            for s, i in zip(scores, indices)
        ],
        args,
    )
    assert_close(got, want, 1e-6, "MLX balance loss vs reference")
    assert_close(got_t, want, 1e-12, "twin balance loss vs reference")


def test_balance_loss_is_one_when_uniform():
    """Every expert chosen equally often, equal scores: f_i = 1, P_i = 1/E, so 1 per layer."""
    E, k, T = 4, 2, 2
    args = tiny_args(n_routed_experts=E, num_experts_per_tok=k)
    idx = np.array([[[0, 1], [2, 3]]])
    s = np.full((1, T, E), 0.3)
    assert ref_balance([s], [idx], E, k) == pytest.approx(1.0, abs=1e-15)
    r = mm.Routing(mx.array(s.astype(np.float32)), mx.array(idx), mx.zeros(E), mx.array(0))
    assert float(balance_loss([r], args)) == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------ MTP and total
@pytest.mark.parametrize("depth,B,T", [(1, 2, 9), (2, 3, 12)])
def test_mtp_loss_and_total_match_reference(seed, depth, B, T):
    """From each twin's own logits, scores and chosen experts: the reference CE, MTP loss,
    balance loss and total = CE + alpha * balance + lambda * MTP equal the twins' LossTerms."""
    args = tiny_args(num_nextn_predict_layers=depth, balance_loss_alpha=0.05, mtp_loss_weight=0.3)
    mlx, ref = twins(args)
    rng = np.random.default_rng(seed)
    for moe, moe_t in zip(moe_layers(mlx), tl.moe_layers(ref)):
        set_bias(moe, moe_t, random_bias(rng, args.n_routed_experts, 0.05))
    tokens = rng.integers(0, args.vocab_size, (B, T + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    E, k = args.n_routed_experts, args.num_experts_per_tok

    def check(terms, logits, hidden_routing, mtp_out, what, tol):
        mtp_logits, mtp_routing = mtp_out
        assert [to_np(x).shape[1] for x in mtp_logits] == [T - d for d in range(1, depth + 1)]
        routing = list(hidden_routing) + list(mtp_routing)
        ce = ref_ce(to_np(logits), targets)
        mtp = ref_mtp([to_np(x) for x in mtp_logits], tokens)
        bal = ref_balance(
            [to_np(r.scores) for r in routing], [to_np(r.indices) for r in routing], E, k
        )
        total = ce + args.balance_loss_alpha * bal + args.mtp_loss_weight * mtp
        for name, want in (("ce", ce), ("mtp", mtp), ("balance", bal), ("total", total)):
            assert_close(getattr(terms, name), want, tol, f"{what} {name} vs reference")
        assert mtp > 0 and bal > 0

    terms = loss_terms(mlx, mx.array(inputs), mx.array(targets))
    logits, hidden, routing = mlx.forward(mx.array(inputs))
    check(terms, logits, routing, mlx.mtp_forward(hidden, mx.array(inputs)), "MLX", 1e-5)
    with torch.no_grad():
        terms_t = tl.loss_terms(ref, torch.from_numpy(inputs), torch.from_numpy(targets))
        logits_t, hidden_t, routing_t = ref(torch.from_numpy(inputs))
        mtp_t = ref.mtp_forward(hidden_t, torch.from_numpy(inputs))
    check(terms_t, logits_t, routing_t, mtp_t, "twin", 1e-10)


# ------------------------------------------------------------------------ lr schedules
SCHEDULES = [
    ("cosine", 3e-3, 30, 500, 0.1, 0.2),
    ("cosine", 1e-3, 0, 17, 0.0, 0.2),
    ("wsd", 3e-3, 10, 100, 0.1, 0.2),
    ("wsd", 2e-4, 5, 33, 0.05, 0.3),
    ("constant", 1e-3, 7, 50, 0.1, 0.2),
]


@pytest.mark.parametrize("kind,lr,warmup,total,ratio,frac", SCHEDULES)
def test_lr_schedule_matches_reference(kind, lr, warmup, total, ratio, frac):
    """lr_at (the twin's and the tests' schedule) and make_schedule (the MLX trainer's) against
    the reference, past the end too; plus the shape the SPEC asks for."""
    steps = np.arange(total + 5)
    want = ref_lr(steps, lr, warmup, total, kind, ratio, frac)
    got = np.array([lr_at(int(s), lr, warmup, total, kind, ratio, frac) for s in steps[:total]])
    np.testing.assert_allclose(got, want[:total], rtol=1e-12, atol=0, err_msg="lr_at")
    table = make_schedule(lr, warmup, total, kind, ratio, frac)
    got_mx = np.array([float(table(mx.array(int(s)))) for s in steps])
    np.testing.assert_allclose(got_mx, want, rtol=1e-6, atol=0, err_msg="make_schedule")
    if warmup:
        assert want[warmup - 1] == pytest.approx(lr) and (np.diff(want[:warmup]) > 0).all()
    if warmup or kind != "cosine":  # cosine without warmup starts one step into its decay
        assert want.max() == pytest.approx(lr)
    assert (np.diff(want[max(warmup - 1, 0) :]) <= 1e-18).all(), "not non-increasing after warmup"
    end = lr if kind == "constant" else lr * ratio
    assert want[total - 1] == pytest.approx(end) and want[-1] == pytest.approx(end)


def test_trainer_optimizer_applies_the_reference_lr():
    """The MLX optimizer uses the schedule at its 0-based update count: the lr of its n-th
    update (read from each AdamW's state) is the reference's lr at step n."""
    lr, warmup, total = 1e-2, 3, 8
    opt = make_optimizer(make_schedule(lr, warmup, total, "cosine"), weight_decay=0.1)
    params = {"w": mx.ones((2, 2)), "b": mx.ones((2,))}
    want = ref_lr(np.arange(total + 2), lr, warmup, total, "cosine")
    for n in range(total + 2):
        params = opt.apply_gradients({"w": mx.ones((2, 2)), "b": mx.ones((2,))}, params)
        for sub in opt.optimizers:
            assert math.isclose(float(sub.learning_rate), want[n], rel_tol=1e-6), (n, want[n])
