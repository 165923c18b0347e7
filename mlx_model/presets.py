"""Named model presets (`--preset NAME`): tiny, small (the default), small-dense, seed, mac8gb.

Each preset is a function returning a fresh `ModelArgs` (stdlib only, like config.py); the
training settings that go with each (batch, steps, learning rate) are in `train_config.py`.
"""

from __future__ import annotations

from .config import ConfigError, ModelArgs


def _tiny() -> ModelArgs:
    return ModelArgs(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=256,
    )


def _small() -> ModelArgs:
    return ModelArgs()


def dense_baseline(args: ModelArgs) -> ModelArgs:
    """`args` with every FFN dense (first_k_dense_replace = all layers, which keeps the HF form);
    its intermediate_size is unchanged, so it is the dense baseline of equal active parameters
    when that equals the shared + top-k routed widths (as in `small`)."""
    return args.replace(first_k_dense_replace=args.num_hidden_layers)


def _small_dense() -> ModelArgs:
    # The dense baseline of `small`: every FFN dense, intermediate_size 768 = the shared expert
    # (256) + top-2 routed experts (2 x 256), so the same active parameters per token (less the
    # [8, 256] router per MoE layer).
    return dense_baseline(_small())


def _seed() -> ModelArgs:
    # The seed system (../shared/SEED-NOTES.md): MQA, pre-LayerNorm, 2 experts, top-1 softmax
    # gate, capacity 1.25, every layer MoE, no shared expert, FFN 1024.
    return ModelArgs(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=1024,
        moe_intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=1,
        attention_type="mqa",
        norm_type="layernorm",
        n_routed_experts=2,
        n_shared_experts=0,
        num_experts_per_tok=1,
        first_k_dense_replace=0,
        scoring_func="softmax",
        norm_topk_prob=False,
        capacity_factor=1.25,
        balance_loss_alpha=0.01,
        bias_update_rule="sign",  # the settings this preset was measured with
        bias_update_speed=0.001,
        max_position_embeddings=512,
    )


def _mac8gb() -> ModelArgs:
    # A DeepSeek-V3-style model (MLA with q/kv low-rank, 88 routed experts in 8 groups of 11,
    # top-4 within the best 4 groups, sigmoid noaux_tc routing, 1 shared expert, 1 dense layer;
    # 409.6M parameters) whose training peak stays under 5.0 GB (an 8 GB Apple-silicon Mac's
    # working set) with its training preset (float32 weights, bfloat16 m, factored second
    # moment, gradients added a group at a time, chunked update, 8K tokens per step):
    # `python -m mlx_model.train --preset mac8gb --plan true` prints the plan.
    return ModelArgs(
        vocab_size=16384,
        hidden_size=768,
        intermediate_size=2048,
        moe_intermediate_size=256,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=88,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=8,
        topk_group=4,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        max_position_embeddings=1024,
    )


PRESETS = {
    "tiny": _tiny,
    "small": _small,
    "small-dense": _small_dense,
    "seed": _seed,
    "mac8gb": _mac8gb,
}


def preset(name: str) -> ModelArgs:
    """A fresh ModelArgs for a named preset (see PRESETS)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
