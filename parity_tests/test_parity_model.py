"""Whole model: logits of each preset (eval and training mode), cached decoding (prefill,
chunked prefill, one-token steps) against the twin's full forward, and the weight names.

Tolerances: TOL_LOGITS (1e-4 relative) MLX float32 vs torch float64; 1e-5 MLX cached vs MLX full.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from conftest import TOL_LAYER, TOL_LOGITS, assert_close, mqa_args, tiny_args, to_np, twins
from mlx_model.cache import make_cache
from mlx_model.model import Model as MLXModel
from mlx_model.presets import preset
from torch_reference.model import Model as TorchModel

PRESETS = {
    "tiny": lambda: preset("tiny"),
    # Fewer layers to keep the suite fast; widths, attention, norm and routing kinds as preset.
    "small": lambda: preset("small").replace(num_hidden_layers=2),
    "seed": lambda: preset("seed").replace(num_hidden_layers=2),
}
SHAPES = [(1, 1), (2, 7), (3, 16)]


@functools.cache
def preset_twins(name: str, seed: int):
    """Random twins per (preset, seed), built once and shared by the shapes and modes."""
    mx.random.seed(seed)
    torch.manual_seed(seed)
    return twins(PRESETS[name]())


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("B,T", SHAPES)
def test_logits(seed, name, training, B, T):
    """Capacity dropping (the seed preset) happens in training mode only."""
    mlx, ref = preset_twins(name, seed)
    args = mlx.args
    mlx.train(training)
    ref.train(training)
    tokens = np.random.default_rng(seed).integers(0, args.vocab_size, size=(B, T))
    logits, hidden, routing = mlx.forward(mx.array(tokens))
    logits_t, hidden_t, routing_t = ref(torch.from_numpy(tokens))
    for i, (r, r_t) in enumerate(zip(routing, routing_t)):
        assert (to_np(r.indices) == to_np(r_t.indices)).all(), (
            f"MoE layer {i}: chosen experts differ"
        )
        assert int(r.dropped) == int(r_t.dropped), f"MoE layer {i}: dropped slots differ"
        if not training:
            assert int(r.dropped) == 0
    assert_close(hidden, hidden_t, TOL_LOGITS, f"{name} last hidden state")
    assert_close(logits, logits_t, TOL_LOGITS, f"{name} logits")


def test_capacity_changes_training_logits(seed):
    """The seed preset drops tokens in training mode (checked equal above): make sure it does."""
    args = PRESETS["seed"]().replace(capacity_factor=0.6)
    mlx, ref = twins(args, training=True)
    tokens = np.random.default_rng(seed).integers(0, args.vocab_size, size=(2, 16))
    logits, _, routing = mlx.forward(mx.array(tokens))
    logits_t, _, routing_t = ref(torch.from_numpy(tokens))
    assert sum(int(r.dropped) for r in routing) > 0
    assert [int(r.dropped) for r in routing] == [int(r.dropped) for r in routing_t]
    assert_close(logits, logits_t, TOL_LOGITS, "seed logits with dropping")
    mlx.eval()
    assert to_np(mx.abs(mlx(mx.array(tokens)) - logits).max()) > 1e-3, "dropping changed nothing"


DECODE = {
    "mla": lambda: tiny_args(q_lora_rank=24, num_hidden_layers=3),
    "mqa": lambda: mqa_args(num_hidden_layers=3),
}


@pytest.mark.parametrize("kind", list(DECODE))
@pytest.mark.parametrize("chunks", [(1,), (6,), (3, 5)], ids=["prefill1", "prefill6", "chunked3+5"])
@pytest.mark.parametrize("B", [1, 2])
def test_cached_decoding(seed, kind, chunks, B):
    """Prefill (in one or two chunks: mask "causal" with offset > 0) then one-token steps with
    mlx_model.cache; every position's logits == the twin's full forward (and MLX's)."""
    args = DECODE[kind]()
    mlx, ref = twins(args)
    T = 12
    tokens = np.random.default_rng(seed).integers(0, args.vocab_size, size=(B, T))
    cache = make_cache(args)
    pieces, start = [], 0
    for n in chunks + (1,) * (T - sum(chunks)):
        pieces.append(mlx(mx.array(tokens[:, start : start + n]), cache=cache))
        start += n
    cached = mx.concatenate(pieces, axis=1)
    assert cache[0].offset == T
    assert_close(cached, mlx(mx.array(tokens)), TOL_LAYER, f"{kind} cached vs full (MLX)")
    assert_close(cached, ref(torch.from_numpy(tokens))[0], TOL_LOGITS, f"{kind} cached MLX vs twin")


KEY_CONFIGS = {
    "mla-qlora-mtp": lambda: tiny_args(q_lora_rank=24, num_nextn_predict_layers=2),
    "mqa-layernorm": lambda: mqa_args(),
    "small": lambda: preset("small"),
    "seed": lambda: preset("seed"),
}


@pytest.mark.parametrize("name", list(KEY_CONFIGS))
def test_weight_names_and_shapes(name):
    """state_dict() of the twin == tree_flatten(parameters()) of the MLX model, names and shapes."""
    args = KEY_CONFIGS[name]()
    ref = TorchModel(args)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tree_flatten(MLXModel(args).parameters())}
    assert sorted(got) == sorted(want), (
        f"only MLX: {set(got) - set(want)}; only torch: {set(want) - set(got)}"
    )
    assert got == want
    # The routing bias is saved but not trained; RoPE tables and masks are not weights.
    trainable = {k for k, p in ref.named_parameters()}
    assert {k for k in want if k not in trainable} == {
        k for k in want if "e_score_correction_bias" in k
    }
    assert not any("rope" in k or "mask" in k or "freq" in k for k in want)
