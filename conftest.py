"""Shared test helpers (parity_tests/ and tests/): tiny configs, seeding, error measures, twin pairs.

Reference: the PyTorch twin in float64 on the CPU; subject: the MLX model in float32. The MLX
weights are copied from the twin with tools.convert's functions, so the converter is tested too.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from any directory

from mlx_model import speedups  # noqa: E402  # isort: skip

speedups.enable()  # before mlx.core is imported: fast BLAS and vectorised kernels keep tests fast

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mlx_model.config import ModelArgs  # noqa: E402
from mlx_model.model import Model as MLXModel  # noqa: E402
from mlx_model.presets import preset  # noqa: E402
from tools import convert  # noqa: E402
from torch_reference.model import Model as TorchModel  # noqa: E402

torch.set_num_threads(1)  # tiny tensors: one thread is fastest (2 max on the 2-core box)

# Tolerances (relative L2 error): float32 MLX vs float64 torch.
TOL_LAYER = 1e-5  # one layer (RoPE, attention, MoE)
TOL_LOGITS = 1e-4  # a whole model's logits, losses, one optimizer step
TOL_GRAD = 1e-4  # each parameter's gradient


def tiny_args(**kw) -> ModelArgs:
    """dim 64, 2 layers (1 dense + 1 MoE), 4 experts top-2, MLA. init_std 0.1 so attention is
    far from uniform and a wrong detail shows up as a large error."""
    base = preset("tiny").replace(vocab_size=97, max_position_embeddings=128, init_std=0.1)
    return base.replace(**kw).validate()


def mqa_args(**kw) -> ModelArgs:
    """The seed's kinds at tiny size: MQA, LayerNorm, softmax top-1, capacity 1.25, no shared."""
    base = dict(
        attention_type="mqa",
        norm_type="layernorm",
        num_key_value_heads=1,
        n_shared_experts=0,
        num_experts_per_tok=1,
        first_k_dense_replace=0,
        scoring_func="softmax",
        norm_topk_prob=False,
        capacity_factor=1.25,
    )
    base.update(kw)
    return tiny_args(**base)


def decode_args(kind: str, **kw) -> ModelArgs:
    """Tiny decoding configs (init_std 0.3, so greedy choices are clear): "mla" is the tiny
    preset; "mqa" the seed's MQA + LayerNorm + top-1 softmax gate, shrunk. `kw` overrides."""
    if kind == "mla":
        return preset("tiny").replace(**{"init_std": 0.3, **kw})
    return preset("seed").replace(
        **{
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 256,
            "init_std": 0.3,
            **kw,
        }
    )


@pytest.fixture(params=[0, 1], ids=lambda s: f"seed{s}")
def seed(request) -> int:
    """Seeds MLX, torch and NumPy; tests draw inputs from np.random.default_rng(seed)."""
    mx.random.seed(request.param)
    torch.manual_seed(request.param)
    np.random.seed(request.param)
    return request.param


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (b is the reference)."""
    a, b = to_np(a), to_np(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_close(got, ref, tol: float, what: str = "") -> None:
    """Fail with the relative error and the largest absolute difference."""
    got, ref = to_np(got), to_np(ref)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    err = rel_err(got, ref)
    if not err <= tol:  # also catches NaN
        diff = np.abs(got - ref)
        where = np.unravel_index(np.argmax(diff), diff.shape) if diff.size else ()
        raise AssertionError(
            f"{what}: rel err {err:.3e} > tol {tol:.0e}; max abs diff {diff.max():.3e} at {where}"
        )


def to_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64 if x.is_floating_point() else x.dtype).numpy()
    if isinstance(x, mx.array):
        a = np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)
        return a.astype(np.float64) if a.dtype.kind == "f" else a
    return np.asarray(x)


def to_mx(x: np.ndarray) -> mx.array:
    return mx.array(x.astype(np.float32) if x.dtype == np.float64 else x)


def to_torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def twins(args: ModelArgs, training: bool = False) -> tuple[MLXModel, TorchModel]:
    """(MLX float32 model, torch float64 twin) with the same random weights: the twin is
    initialised, its float32 state dict copied into MLX by tools.convert, then cast to float64."""
    ref = TorchModel(args)
    mlx = MLXModel(args)
    convert.load_mlx_from_torch(mlx, ref.state_dict())
    ref = ref.to(torch.float64)
    ref.train(training)
    mlx.train(training)
    return mlx, ref


def random_bias(rng: np.random.Generator, E: int, scale: float) -> np.ndarray:
    return (rng.standard_normal(E) * scale).astype(np.float32)


def set_bias(mlx_moe, ref_moe, bias: np.ndarray) -> None:
    """Give one MoE layer of each twin the same routing bias (float32 values)."""
    mlx_moe.gate.e_score_correction_bias = mx.array(bias)
    with torch.no_grad():
        ref_moe.gate.e_score_correction_bias.copy_(torch.from_numpy(bias.astype(np.float64)))
