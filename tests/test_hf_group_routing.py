"""Our model loads transformers checkpoints whose routing is group-limited (n_group 4, topk_group
1) with strongly negative correction biases, and gives transformers' logits.

That is where the masking rule shows: transformers 5.24 (like DeepSeek-V3's inference code) fills
dropped groups with -inf; a 0 fill (mlx-lm) lets dropped experts win. Each checkpoint is a fresh
seeded random DeepseekV3ForCausalLM saved by transformers itself; the test also checks, on the
gate inputs transformers saw, that the 0-fill rule would choose other experts (so the
comparison can fail).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mlx_model.checkpoint import load_model  # noqa: E402

E, G, TG, K = 8, 4, 1, 2


def make_hf_model(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=E,
        n_shared_experts=1,
        num_experts_per_tok=K,
        n_group=G,
        topk_group=TG,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers[1:]:  # s + b < 0 for every expert
            layer.mlp.gate.e_score_correction_bias.copy_(-1.5 - 0.5 * torch.rand(E))
    return model


def zero_fill_differs(hidden: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> bool:
    """Would the 0-fill rule choose other experts than the -inf rule (float64)?"""
    c = 1 / (1 + np.exp(-(hidden @ weight.T))) + bias  # [N, E]
    grouped = c.reshape(-1, G, E // G)
    kept = np.argsort(-np.sort(grouped, -1)[..., -2:].sum(-1), -1)[:, :TG]
    dropped = np.ones((c.shape[0], G), bool)
    np.put_along_axis(dropped, kept, False, -1)
    picks = [
        np.sort(np.argsort(-np.where(dropped[..., None], f, grouped).reshape(c.shape), -1)[:, :K])
        for f in (-np.inf, 0.0)
    ]
    return bool((picks[0] != picks[1]).any())


@pytest.mark.parametrize("seed", range(4))
def test_group_limited_negative_bias_matches_transformers(tmp_path, seed):
    theirs = make_hf_model(seed)
    theirs.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=mx.float32)
    ids = np.random.default_rng(seed).integers(0, 256, (2, 16))
    seen = []
    gate = theirs.model.layers[1].mlp.gate
    hook = gate.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().double()))
    with torch.no_grad():
        want = theirs(torch.tensor(ids)).logits.float().numpy()
    hook.remove()
    hidden = seen[0].reshape(-1, 64).numpy()
    w = gate.weight.detach().double().numpy()
    b = gate.e_score_correction_bias.detach().double().numpy()
    assert zero_fill_differs(hidden, w, b), "the 0-fill rule would pass: inputs too easy"
    got = np.array(ours(mx.array(ids)).astype(mx.float32))
    assert_close(got, want, 1e-4, f"ours vs transformers, n_group {G}, topk_group {TG}")
