"""ModelArgs as data: every validation rule refuses a bad value with its own message, every
field has help text, and config.json's Hugging Face translation (hf.py) round-trips."""

from __future__ import annotations

import dataclasses

import pytest

from mlx_model import hf
from mlx_model.config import RULES, ConfigError, ModelArgs, field_help
from mlx_model.presets import PRESETS, preset

MQA = dict(attention_type="mqa", num_key_value_heads=1)
# (overrides on the default config, start of the expected "why"): one case per rule at least.
CASES = [
    (dict(vocab_size=0), "vocab_size=0: must be a positive integer"),
    (dict(hidden_size=-1), "hidden_size=-1: must be a positive integer"),
    (dict(intermediate_size=True), "intermediate_size=True: must be a positive integer"),
    (dict(num_hidden_layers=0), "num_hidden_layers=0: must be a positive integer"),
    (dict(num_attention_heads=0), "num_attention_heads=0: must be a positive integer"),
    (dict(max_position_embeddings=0), "max_position_embeddings=0: must be a positive integer"),
    (dict(kv_lora_rank=0), "kv_lora_rank=0: must be a positive integer"),
    (dict(qk_nope_head_dim=0), "qk_nope_head_dim=0: must be a positive integer"),
    (dict(qk_rope_head_dim=0), "qk_rope_head_dim=0: must be a positive integer"),
    (dict(v_head_dim=2.5), "v_head_dim=2.5: must be a positive integer"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size=0: must be a positive integer"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok=0: must be a positive integer"),
    (dict(n_group=0), "n_group=0: must be a positive integer"),
    (dict(topk_group=0), "topk_group=0: must be a positive integer"),
    (dict(model_type="llama"), "model_type='llama': only 'deepseek_v3'"),
    (dict(attention_type="gqa"), "attention_type='gqa': choose 'mla' or 'mqa'"),
    (dict(norm_type="batchnorm"), "norm_type='batchnorm': choose 'rmsnorm' or 'layernorm'"),
    (dict(scoring_func="relu"), "scoring_func='relu': choose 'sigmoid' or 'softmax'"),
    (dict(q_lora_rank=0), "q_lora_rank=0: must be null or a positive integer"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim=7: RoPE needs an even width"),
    (dict(num_key_value_heads=1), "num_key_value_heads=1: MLA needs num_key_value_heads =="),
    (dict(MQA, num_attention_heads=3), "num_attention_heads=3: must divide hidden_size 256"),
    (dict(MQA, hidden_size=24, num_attention_heads=8), "hidden_size=24: hidden_size / num_"),
    (dict(n_routed_experts=-1), "n_routed_experts=-1: must be >= 0 (0 = dense model)"),
    (dict(n_shared_experts=-1), "n_shared_experts=-1: must be >= 0"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok=9: top-k must be <= n_routed_experts (8)"),
    (dict(n_group=3), "n_group=3: must divide n_routed_experts (8)"),
    (dict(n_group=2, topk_group=3), "topk_group=3: must be <= n_group (2)"),
    (dict(n_group=8, topk_group=1, num_experts_per_tok=1), "n_group=8: each group needs >= 2"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=4), "topk_group=1: kept groups hold"),
    (dict(first_k_dense_replace=-1), "first_k_dense_replace=-1: must be >= 0"),
    (dict(moe_layer_freq=0), "moe_layer_freq=0: must be >= 1"),
    (dict(capacity_factor=-0.5), "capacity_factor=-0.5: must be >= 0 (0 = no token dropping)"),
    (dict(bias_update_speed=-1.0), "bias_update_speed=-1.0: must be >= 0"),
    (dict(bias_update_rule="sgn"), "bias_update_rule='sgn': choose 'sign' or 'relative'"),
    (dict(balance_loss_alpha=-1.0), "balance_loss_alpha=-1.0: must be >= 0"),
    (dict(mtp_loss_weight=-1.0), "mtp_loss_weight=-1.0: must be >= 0"),
    (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers=-1: must be >= 0"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor=0.0: must be > 0"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps=0.0: must be > 0"),
    (dict(rope_theta=-1.0), "rope_theta=-1.0: must be > 0"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings=True: the output head is untied"),
    (dict(attention_bias=True), "attention_bias=True: not supported; set false"),
    (dict(rope_scaling={"type": "yarn"}), "rope_scaling={'type': 'yarn'}: RoPE scaling (YaRN)"),
    (dict(hidden_act="gelu"), "hidden_act='gelu': only 'silu'"),
    (dict(topk_method="greedy"), "topk_method='greedy': only 'noaux_tc'"),
    (dict(rope_interleave=False), "rope_interleave=False: only interleaved RoPE"),
]


def broken_rule(args: ModelArgs):
    """The first rule `args` breaks (None if valid)."""
    return next((r for r in RULES if not r.ok(args)), None)


@pytest.mark.parametrize("overrides,message", CASES, ids=[m.split(":")[0] for _, m in CASES])
def test_rule_refuses_bad_value(overrides, message):
    args = ModelArgs(**overrides)
    with pytest.raises(ConfigError) as e:
        args.validate()
    text = str(e.value)
    assert text.startswith("invalid config: " + message), text
    assert "\n" not in text
    assert text == broken_rule(args).message(args)  # the table's own message, nothing else


def test_every_rule_has_a_case():
    hit = {id(broken_rule(ModelArgs(**o))) for o, _ in CASES}
    missing = [f"{r.key}: {r.why}" for r in RULES if id(r) not in hit]
    assert not missing, f"rules without a test case: {missing}"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    assert preset(name).validate() is not None


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'nope': choose one of"):
        preset("nope")


def test_every_field_has_help():
    helps = field_help()
    assert set(helps) == {f.name for f in dataclasses.fields(ModelArgs)}
    assert all(len(h) > 5 for h in helps.values()), [k for k, h in helps.items() if len(h) <= 5]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
    args = preset(name)
    d = hf.config_from_args(args)
    assert d["model_type"] == (
        "deepseek_v3" if hf.hf_incompatibility(args) is None else "mlx_deepseek"
    )
    assert set(d) - set(args.to_dict()) <= set(hf.CONFIG_EXTRAS)
    assert hf.args_from_config(d) == args


def test_transformers_config_translation():
    """transformers 5 spellings: RoPE under rope_parameters, nulls for neutral values, lists."""
    d = {
        "model_type": "deepseek_v3",
        "rope_parameters": {"rope_theta": 5e4, "rope_type": "default"},
        "n_group": None,
        "topk_group": None,
        "eos_token_id": [7, 8],
        "bos_token_id": [],
        "unknown_key": 1,
    }
    args = hf.args_from_config(d)
    assert (args.rope_theta, args.rope_scaling, args.n_group, args.topk_group) == (5e4, None, 1, 1)
    assert (args.eos_token_id, args.bos_token_id) == (7, None)
    yarn = hf.args_from_config({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    assert yarn.rope_scaling == {"type": "yarn", "factor": 4.0}


def test_hf_incompatibility_names_each_reason():
    seed = preset("seed")
    reason = hf.hf_incompatibility(seed)
    for word in ("mqa", "layernorm", "softmax", "capacity_factor", "n_shared_experts 0"):
        assert word in reason, reason
    assert hf.hf_incompatibility(preset("tiny")) is None
    assert "n_routed_experts 0" in hf.hf_incompatibility(ModelArgs(n_routed_experts=0))
