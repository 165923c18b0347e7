"""The fast paths compute the same function as the plain ones (MLX vs MLX, float32).

- the compiled training step (accumulation + update) vs the same step run eagerly;
- the expert dispatches ("dense" and the blocked "gather", at several block sizes) on random
  routes: outputs and gradients;
- the written-out cross-entropy vs mlx.nn.losses.cross_entropy;
- the written-out CPU attention vs mx.fast.scaled_dot_product_attention;
- swiglu's hand-written gradient vs autodiff of silu(g) * u, and vs float64 NumPy.
Tolerances: 1e-5 relative L2 for single layers and losses (float32 rounding of a different
summation order), 1e-5 for parameters after one optimizer step.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from conftest import assert_close, mqa_args, tiny_args
from mlx_model.attention import attention_cpu
from mlx_model.layers import swiglu
from mlx_model.loss import cross_entropy
from mlx_model.model import Model
from mlx_model.moe import Experts, block_layout
from mlx_model.train_config import TrainConfig
from mlx_model.trainer import Trainer

TOL = 1e-5


def _clone(model: Model) -> Model:
    other = Model(model.args)
    other.update(tree_map(lambda p: mx.array(np.array(p)), model.parameters()))
    other.train()
    mx.eval(other.parameters())
    return other


@pytest.mark.parametrize("kind", ["mla", "mqa"])
def test_compiled_step_matches_eager(seed, kind):
    args = tiny_args() if kind == "mla" else mqa_args()
    rng = np.random.default_rng(seed)
    base = Model(args)
    base.train()
    mx.eval(base.parameters())
    batches = [
        mx.array(rng.integers(0, args.vocab_size, (2, 17)).astype(np.int32)) for _ in range(2)
    ]
    results = []
    for compiled in (True, False):
        model = _clone(base)
        cfg = TrainConfig(
            preset="tiny",
            batch_size=2,
            seq_len=16,
            accum=2,
            max_steps=10,
            warmup=2,
            compile=compiled,
            progress=False,
        )
        trainer = Trainer(cfg, args, model)
        metrics = [trainer.step(batches) for _ in range(2)]
        results.append((metrics, dict(tree_flatten(model.parameters()))))
    (m_c, p_c), (m_e, p_e) = results
    for a, b in zip(m_c, m_e):
        for key in ("loss", "ce", "grad_norm"):
            assert abs(a[key] - b[key]) <= TOL * max(1.0, abs(b[key])), (
                f"{key}: {a[key]} vs {b[key]}"
            )
    for name in p_e:
        assert_close(p_c[name], p_e[name], TOL, f"param {name} after 2 steps")


def _routes(rng, N: int, E: int, k: int):
    logits = rng.standard_normal((N, E))
    idx = np.argsort(-logits, axis=-1)[:, :k].astype(np.int32)  # distinct experts per token
    w = rng.random((N, k)).astype(np.float32) + 0.1
    return mx.array(idx), mx.array(w)


@pytest.mark.parametrize("E,k", [(4, 2), (8, 2), (2, 1), (8, 1)])
@pytest.mark.parametrize("N", [1, 7, 300])
@pytest.mark.parametrize("max_block", [1, 8, 64])
@pytest.mark.parametrize("skewed", ["random", "last", "first"])
def test_dispatches_agree(seed, E, k, N, max_block, skewed):
    """dense vs gather: forward output and gradients wrt x, the weights and the routing weights.
    Skewed routes send every token to the same k experts, the last or the first ones (the others
    get none): the blocked layout's padding and empty groups, the padding rows (which hold some
    token's row, see moe.dispatch_rows), and the hand-written gradients of its row gathers."""
    args = tiny_args(n_routed_experts=E, num_experts_per_tok=k, moe_intermediate_size=24)
    rng = np.random.default_rng(seed)
    experts = Experts(args)
    experts.max_block = max_block
    experts.update(
        tree_map(
            lambda p: mx.array(rng.standard_normal(p.shape).astype(np.float32) * 0.2),
            experts.parameters(),
        )
    )
    x = mx.array(rng.standard_normal((N, args.hidden_size)).astype(np.float32))
    idx, w = _routes(rng, N, E, k)
    if skewed != "random":
        first = E - k if skewed == "last" else 0
        idx = mx.broadcast_to(mx.arange(first, first + k, dtype=mx.int32), (N, k))
    out = {}
    for dispatch in ("dense", "gather"):
        experts.dispatch = dispatch

        def f(params, x, w):
            experts.update(params)
            return (experts(x, w, idx) * mx.cos(x)).sum()  # a loss that weighs every output

        y = experts(x, w, idx)
        g_params, g_x, g_w = mx.grad(f, argnums=(0, 1, 2))(experts.trainable_parameters(), x, w)
        out[dispatch] = (y, dict(tree_flatten(g_params)), g_x, g_w)
    (y_d, gp_d, gx_d, gw_d), (y_g, gp_g, gx_g, gw_g) = out["dense"], out["gather"]
    assert_close(y_g, y_d, TOL, f"output (N={N}, block<={max_block})")
    assert_close(gx_g, gx_d, TOL, "grad x")
    assert_close(gw_g, gw_d, TOL, "grad routing weights")
    for name in gp_d:
        assert_close(gp_g[name], gp_d[name], TOL, f"grad {name}")


def _layout_routes(rng, E: int, k: int, b: int) -> dict:
    """Routes [N, k] for block_layout: random; all slots on the last or the first experts; and
    the worst case for padding (each expert but the last holds 1 + a multiple of b slots)."""
    N = 5 * E * b + 3
    routes = {"random": np.argsort(rng.random((N, E)), axis=-1)[:, :k]}
    routes["last"] = np.broadcast_to(np.arange(E - k, E), (N, k))
    routes["first"] = np.broadcast_to(np.arange(k), (N, k))
    if k == 1:  # the worst case: counts 1 + b*m for experts 0..E-2, the rest on the last
        counts = [1 + b * int(m) for m in rng.integers(0, 3, E - 1)]
        worst = np.repeat(np.arange(E - 1), counts)
        worst = np.concatenate([worst, np.full(N - len(worst), E - 1)])
        routes["worst"] = rng.permutation(worst)[:, None]
    return routes


@pytest.mark.parametrize("E,k,b", [(8, 1, 4), (8, 2, 4), (4, 2, 8), (16, 4, 2), (3, 1, 16)])
def test_block_layout_rows(seed, E, k, b):
    """block_layout against its definition, in NumPy: every slot gets its own row < R, in a block
    of its own expert; row_slot inverts dest and marks every other row as padding (S); R is
    S + (E-1)*(b-1) rounded up to a block, and the worst-case routing uses all of that bound."""
    rng = np.random.default_rng(seed)
    for name, idx in _layout_routes(rng, E, k, b).items():
        N = idx.shape[0]
        S = N * k
        dest, row_slot, block_expert, R = block_layout(mx.array(idx.astype(np.int32)), E, b)
        dest, row_slot, block_expert = np.array(dest), np.array(row_slot), np.array(block_expert)
        assert R == -(-(S + (E - 1) * (b - 1)) // b) * b and R % b == 0, name
        flat = dest.reshape(-1)
        assert len(set(flat.tolist())) == S and flat.min() >= 0 and flat.max() < R, name
        np.testing.assert_array_equal(block_expert[flat // b], idx.reshape(-1), err_msg=name)
        np.testing.assert_array_equal(row_slot[flat], np.arange(S), err_msg=name)
        padding = np.setdiff1d(np.arange(R), flat)
        assert (row_slot[padding] == S).all(), name
        assert (np.diff(block_expert.astype(np.int64)) >= 0).all(), name
        if name == "worst":
            assert flat.max() == S + (E - 1) * (b - 1) - 1, "the bound is reached"


def test_block_size_bounds_padding():
    experts = Experts(tiny_args(n_routed_experts=8, num_experts_per_tok=2))
    assert experts.block_size(2) == 1  # decoding one token: one row per slot
    for slots in (1, 16, 100, 256, 4096, 10**6):
        b = experts.block_size(slots)
        assert b & (b - 1) == 0 and 1 <= b <= experts.max_block
        assert 8 * (b - 1) * 8 <= max(slots, 0) or b == 1  # padding <= an eighth of the slots


@pytest.mark.parametrize("V", [97, 4096])
def test_cross_entropy_matches_mlx(seed, V):
    rng = np.random.default_rng(seed)
    logits = mx.array((rng.standard_normal((3, 11, V)) * 4).astype(np.float32))
    targets = mx.array(rng.integers(0, V, (3, 11)).astype(np.int32))

    def ref(x):
        return nn.losses.cross_entropy(x, targets, reduction="mean")

    def ours(x):
        return cross_entropy(x, targets)

    for fn in (lambda f: f, mx.compile):
        v_r, g_r = mx.value_and_grad(fn(ref))(logits)
        v_o, g_o = mx.value_and_grad(fn(ours))(logits)
        assert_close(v_o, v_r, TOL, "CE value")
        assert_close(g_o, g_r, TOL, "CE grad")


@pytest.mark.parametrize("kv_heads", [1, 4])
@pytest.mark.parametrize("mask_kind", ["causal", "bool", "none", "decode"])
def test_cpu_attention_matches_fast_sdpa(seed, kv_heads, mask_kind):
    rng = np.random.default_rng(seed)
    B, H, d, dv = 2, 4, 24, 16
    L, S = (1, 9) if mask_kind == "decode" else (9, 9)
    q = mx.array(rng.standard_normal((B, H, L, d)).astype(np.float32))
    k = mx.array(rng.standard_normal((B, kv_heads, S, d)).astype(np.float32))
    v = mx.array(rng.standard_normal((B, kv_heads, S, dv)).astype(np.float32))
    mask = {
        "causal": "causal",
        "none": None,
        "decode": None,
        "bool": mx.array(rng.random((B, 1, L, S)) > 0.3) | mx.eye(L, S, dtype=mx.bool_),
    }[mask_kind]
    scale = d**-0.5

    def f(q, k, v, att):
        return (att(q, k, v, scale, mask) * mx.sin(q[..., :dv])).sum()

    fast = lambda q, k, v, s, m: mx.fast.scaled_dot_product_attention(q, k, v, scale=s, mask=m)  # noqa: E731
    assert_close(
        attention_cpu(q, k, v, scale, mask), fast(q, k, v, scale, mask), TOL, "attention output"
    )
    g_o = mx.grad(lambda *a: f(*a, attention_cpu), argnums=(0, 1, 2))(q, k, v)
    g_f = mx.grad(lambda *a: f(*a, fast), argnums=(0, 1, 2))(q, k, v)
    for a, b, n in zip(g_o, g_f, "qkv"):
        assert_close(a, b, TOL, f"grad {n}")


def test_bfloat16_experts_run_on_any_device(seed):
    """gather_mm on MLX's CPU is float32-only: bfloat16 must still work (dense fallback), ~2e-2."""
    args = tiny_args(n_routed_experts=8, num_experts_per_tok=2)
    rng = np.random.default_rng(seed)
    experts = Experts(args)
    x = mx.array(rng.standard_normal((300, args.hidden_size)).astype(np.float32))
    idx, w = _routes(rng, 300, 8, 2)
    want = experts(x, w, idx)
    experts.update(tree_map(lambda p: p.astype(mx.bfloat16), experts.parameters()))
    got = experts(x.astype(mx.bfloat16), w, idx)
    assert got.dtype == mx.bfloat16
    assert_close(got, want, 2e-2, "bfloat16 experts")


def test_cached_decode_step_sees_new_weights():
    """An Engine reuses its compiled decode step across calls, but never with stale weights."""
    from mlx_model.engine import Engine
    from mlx_model.sampling import SamplingParams

    args = tiny_args()
    model = Model(args)
    model.eval()
    params = SamplingParams(max_tokens=6, temperature=0.0, top_p=1.0)
    prompt = [[1, 2, 3, 4]]
    engine = Engine(model)
    first = list(engine.decode(prompt, params))
    step = next(iter(engine.steps.values()))
    assert list(engine.decode(prompt, params)) == first  # reused step, same tokens
    assert next(iter(engine.steps.values())) is step
    other = Model(args)  # new random weights loaded into the same model object
    other.eval()
    model.update(other.parameters())
    want = list(Engine(other).decode(prompt, params, compiled=False))
    assert want != first  # (else this test could not tell stale weights from fresh ones)
    assert list(engine.decode(prompt, params)) == want


@pytest.mark.parametrize("compiled", [False, True])
def test_swiglu_gradient(seed, compiled):
    """swiglu's custom VJP == autodiff of silu(g) * u == float64 NumPy, including saturated
    gates (|g| = 60, 100: exp overflows in one spelling of the sigmoid; no NaN, right limits)."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((37, 53)).astype(np.float32) * 4
    g[0, :4] = [-100.0, 100.0, -60.0, 60.0]
    u = rng.standard_normal(g.shape).astype(np.float32)
    c = rng.standard_normal(g.shape).astype(np.float32)  # cotangent
    ours = mx.grad(lambda a, b: (swiglu(a, b) * mx.array(c)).sum(), argnums=(0, 1))
    auto = mx.grad(lambda a, b: (nn.silu(a) * b * mx.array(c)).sum(), argnums=(0, 1))
    if compiled:
        ours, auto = mx.compile(ours), mx.compile(auto)
    got, ref = ours(mx.array(g), mx.array(u)), auto(mx.array(g), mx.array(u))
    gd, ud, cd = (x.astype(np.float64) for x in (g, u, c))
    s = 1 / (1 + np.exp(-gd))
    exact = (cd * ud * (s + gd * s * (1 - s)), cd * gd * s)
    for name, a, b, e in zip(("d/dg", "d/du"), got, ref, exact):
        assert np.isfinite(np.array(a)).all(), name
        assert_close(a, b, TOL, f"{name} vs autodiff")
        assert_close(a, e, TOL, f"{name} vs float64")
    assert_close(swiglu(mx.array(g), mx.array(u)), gd * s * ud, TOL, "forward vs float64")
