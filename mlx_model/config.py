"""Model configuration: one dataclass, Hugging Face `deepseek_v3` key names plus our own.

Stdlib only (no MLX import) so the PyTorch twin and the tools can import it cheaply.
Every default lives here. `ModelArgs.to_dict()` is what `config.json` holds; keys that the
`deepseek_v3` format cannot express are our own extras, which mlx-lm and transformers ignore.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration value; the message is one line naming the key and the fix."""


# config.json `model_type`: the Hugging Face family when the config has a deepseek_v3 form, else
# our own name, so that mlx-lm and transformers refuse the directory ("model type mlx_deepseek
# not supported") instead of loading different weights or silently computing something else.
HF_MODEL_TYPE = "deepseek_v3"
OWN_MODEL_TYPE = "mlx_deepseek"
HF_ARCHITECTURE = "DeepseekV3ForCausalLM"
OWN_ARCHITECTURE = "MlxDeepseekForCausalLM"


@dataclass
class ModelArgs:
    """Architecture of the DeepSeek-style model.

    Hugging Face `deepseek_v3` keys:
        vocab_size, hidden_size: token vocabulary and model width.
        intermediate_size: hidden width of the dense SwiGLU MLP (layers < first_k_dense_replace).
        moe_intermediate_size: hidden width of each routed expert (shared: times n_shared_experts).
        num_hidden_layers, num_attention_heads, num_key_value_heads (= heads for MLA).
        q_lora_rank: None -> plain q_proj; else q_a_proj -> RMSNorm -> q_b_proj.
        kv_lora_rank: width of the cached latent c_kv.
        qk_nope_head_dim, qk_rope_head_dim, v_head_dim: per-head query/key parts and value width.
        n_routed_experts (0 = no MoE), n_shared_experts, num_experts_per_tok (top-k).
        n_group, topk_group: group-limited routing (keep topk_group of n_group groups).
        first_k_dense_replace: the first k layers use the dense MLP.
        norm_topk_prob, routed_scaling_factor: weight normalisation and scaling.
        scoring_func: "sigmoid" (V3) or "softmax" (V2 / the seed).
        rms_norm_eps, max_position_embeddings, rope_theta, rope_scaling (YaRN dict or None).
        num_nextn_predict_layers: multi-token prediction depth D (0 = off).
    Our own keys:
        attention_type: "mla" (Multi-head Latent Attention) or "mqa" (the seed's multi-query
            attention: one K/V head of width head_dim = hidden_size / heads, standard RoPE).
        norm_type: "rmsnorm" or "layernorm" (the seed's pre-LayerNorm).
        bias_update_speed: gamma of the auxiliary-loss-free bias update (0 = off).
        balance_loss_alpha: weight of the sequence-wise balance loss.
        capacity_factor: 0 = no dropping; else each expert takes at most
            ceil(cf * k * T / E) tokens of each sequence (earlier tokens first) in training.
        mtp_loss_weight: lambda of the MTP loss (divided by D).
        init_std: standard deviation of the random weight initialisation.
    """

    model_type: str = "deepseek_v3"
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    moe_intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    q_lora_rank: int | None = None
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    moe_layer_freq: int = 1
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # --- our own keys (ignored by mlx-lm and transformers) ---
    attention_type: str = "mla"
    norm_type: str = "rmsnorm"
    bias_update_speed: float = 0.001
    balance_loss_alpha: float = 1e-4
    capacity_factor: float = 0.0
    mtp_loss_weight: float = 0.3
    init_std: float = 0.02

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        """Query/key width per head: nope + rope for MLA, hidden/heads for MQA."""
        if self.attention_type == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention_type == "mla" else self.head_dim

    @property
    def softmax_scale(self) -> float:
        """(qk head dim)^-0.5, times mscale^2 under YaRN (SPEC section 3)."""
        scale = self.head_dim**-0.5
        rs = self.rope_scaling or {}
        mscale_all_dim = rs.get("mscale_all_dim", 0)
        factor = rs.get("factor", 1.0)
        if mscale_all_dim and factor > 1:
            s = 0.1 * mscale_all_dim * math.log(factor) + 1.0
            scale = scale * s * s
        return scale

    def is_moe_layer(self, i: int) -> bool:
        """Layer i uses DeepSeekMoE (else the dense MLP)."""
        return (
            self.n_routed_experts > 0
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
        )

    def cache_numbers_per_token(self) -> int:
        """Numbers cached per token over all layers (latent for MLA, one K/V head for MQA)."""
        if self.attention_type == "mla":
            per_layer = self.kv_lora_rank + self.qk_rope_head_dim
        else:
            per_layer = 2 * self.head_dim
        return self.num_hidden_layers * per_layer

    def hf_incompatibility(self) -> str | None:
        """Why this config has no Hugging Face `deepseek_v3` form, or None if it has one."""
        reasons = []
        if self.attention_type != "mla":
            reasons.append("attention_type 'mqa' (deepseek_v3 only has MLA)")
        if self.norm_type != "rmsnorm":
            reasons.append("norm_type 'layernorm' (deepseek_v3 only has RMSNorm)")
        if self.n_routed_experts > 0 and self.scoring_func != "sigmoid":
            reasons.append("scoring_func 'softmax' (deepseek_v3 uses sigmoid with noaux_tc)")
        if self.n_routed_experts > 0 and self.capacity_factor > 0:
            reasons.append("capacity_factor > 0 (deepseek_v3 never drops tokens)")
        if self.n_routed_experts > 0 and self.n_shared_experts < 1:
            reasons.append("n_shared_experts 0 (the format needs >= 1 shared expert)")
        if self.n_routed_experts == 0:
            reasons.append("n_routed_experts 0 (deepseek_v3 layers past first_k_dense are MoE)")
        if self.n_routed_experts > 0 and self.moe_layer_freq != 1:
            reasons.append(
                "moe_layer_freq != 1 (transformers makes every layer past first_k_dense MoE)"
            )
        if self.n_routed_experts > 0 and self.num_experts_per_tok == 1 and self.norm_topk_prob:
            reasons.append(
                "num_experts_per_tok 1 with norm_topk_prob true (mlx-lm and transformers "
                "disagree; use k >= 2 or norm_topk_prob false)"
            )
        return "; ".join(reasons) or None

    # --------------------------------------------------------------- validation
    def validate(self) -> ModelArgs:
        """Raise ConfigError (one line) on the first invalid value; return self."""

        def bad(key: str, why: str) -> None:
            raise ConfigError(f"invalid config: {key}={getattr(self, key)!r}: {why}")

        positive = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ]
        if self.attention_type == "mla":
            positive += ["kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
        if self.n_routed_experts > 0:
            positive += ["moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group"]
        for key in positive:
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(key, "must be a positive integer")
        if self.model_type not in (HF_MODEL_TYPE, OWN_MODEL_TYPE):
            bad("model_type", f"only {HF_MODEL_TYPE!r} (or our {OWN_MODEL_TYPE!r}) is supported")
        if self.attention_type not in ("mla", "mqa"):
            bad("attention_type", "choose 'mla' or 'mqa'")
        if self.norm_type not in ("rmsnorm", "layernorm"):
            bad("norm_type", "choose 'rmsnorm' or 'layernorm'")
        if self.scoring_func not in ("sigmoid", "softmax"):
            bad("scoring_func", "choose 'sigmoid' or 'softmax'")
        if self.q_lora_rank is not None and (
            not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0
        ):
            bad("q_lora_rank", "must be null or a positive integer")
        if self.attention_type == "mla":
            if self.qk_rope_head_dim % 2:
                bad("qk_rope_head_dim", "RoPE needs an even width")
            if self.num_key_value_heads != self.num_attention_heads:
                bad("num_key_value_heads", "MLA needs num_key_value_heads == num_attention_heads")
        else:
            if self.hidden_size % self.num_attention_heads:
                bad("num_attention_heads", f"must divide hidden_size {self.hidden_size}")
            if self.head_dim % 2:
                bad("hidden_size", "hidden_size / num_attention_heads must be even for RoPE")
        if not isinstance(self.n_routed_experts, int) or self.n_routed_experts < 0:
            bad("n_routed_experts", "must be >= 0 (0 = dense model)")
        if self.n_shared_experts < 0:
            bad("n_shared_experts", "must be >= 0")
        if self.n_routed_experts > 0:
            if self.num_experts_per_tok > self.n_routed_experts:
                bad(
                    "num_experts_per_tok",
                    f"top-k must be <= n_routed_experts ({self.n_routed_experts})",
                )
            if self.n_routed_experts % self.n_group:
                bad("n_group", f"must divide n_routed_experts ({self.n_routed_experts})")
            if self.topk_group > self.n_group:
                bad("topk_group", f"must be <= n_group ({self.n_group})")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1 and per_group < 2:
                bad("n_group", "each group needs >= 2 experts (group score is a top-2 sum)")
            if self.topk_group * per_group < self.num_experts_per_tok:
                bad("topk_group", "kept groups hold fewer experts than num_experts_per_tok")
        if self.first_k_dense_replace < 0:
            bad("first_k_dense_replace", "must be >= 0")
        if self.moe_layer_freq < 1:
            bad("moe_layer_freq", "must be >= 1")
        if self.capacity_factor < 0:
            bad("capacity_factor", "must be >= 0 (0 = no token dropping)")
        for key in ("bias_update_speed", "balance_loss_alpha", "mtp_loss_weight"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        if self.num_nextn_predict_layers < 0:
            bad("num_nextn_predict_layers", "must be >= 0")
        if self.routed_scaling_factor <= 0:
            bad("routed_scaling_factor", "must be > 0")
        if self.rms_norm_eps <= 0:
            bad("rms_norm_eps", "must be > 0")
        if self.rope_theta <= 0:
            bad("rope_theta", "must be > 0")
        if self.tie_word_embeddings:
            bad("tie_word_embeddings", "the output head is untied; set false")
        if self.attention_bias:
            bad("attention_bias", "not supported; set false")
        if self.rope_scaling is not None:
            bad("rope_scaling", "RoPE scaling (YaRN) is not implemented here; remove it (null)")
        if self.hidden_act != "silu":
            bad("hidden_act", "only 'silu' (SwiGLU experts) is implemented")
        if self.topk_method != "noaux_tc":
            bad("topk_method", "only 'noaux_tc' (top-k of scores + routing bias) is implemented")
        if not self.rope_interleave:
            bad("rope_interleave", "only interleaved RoPE is supported (as in mlx-lm)")
        return self

    # ------------------------------------------------------------ serialisation
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        """Build from a config dict (our config.json or a Hugging Face one); unknown keys ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if kw.get("model_type") == OWN_MODEL_TYPE:
            kw["model_type"] = (
                HF_MODEL_TYPE  # same model; the name only makes other tools refuse it
            )
        # transformers allows null for these and reads null as the neutral value
        neutral_values = {
            "n_routed_experts": 0,
            "n_shared_experts": 0,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 0,
            "norm_topk_prob": False,
        }
        for key, neutral in neutral_values.items():
            if key in kw and kw[key] is None:
                kw[key] = neutral
        # transformers 5 writes RoPE under rope_parameters; top-level keys win when present.
        rp = d.get("rope_parameters") or {}
        if d.get("rope_theta") is None and "rope_theta" in rp:
            kw["rope_theta"] = rp["rope_theta"]
        if d.get("rope_scaling") is None and rp.get("rope_type", "default") not in (
            "default",
            None,
        ):
            kw["rope_scaling"] = {
                ("type" if k == "rope_type" else k): v for k, v in rp.items() if k != "rope_theta"
            }
        rs = kw.get("rope_scaling")
        if isinstance(rs, dict) and rs.get("type", rs.get("rope_type")) == "default":
            kw["rope_scaling"] = None  # {"type": "default"} means no scaling
        for key in ("eos_token_id", "bos_token_id"):
            if isinstance(kw.get(key), list):
                kw[key] = kw[key][0] if kw[key] else None
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """config.json contents: our keys, plus the extra keys HF tools read (SPEC section 1).

        A config with a Hugging Face form gets model_type deepseek_v3; any other gets
        model_type mlx_deepseek (with hf_compatible false and the reason), which only this
        package loads: mlx-lm and transformers refuse it instead of computing something else.
        """
        d = dataclasses.asdict(self)
        reason = self.hf_incompatibility()
        d["model_type"] = HF_MODEL_TYPE if reason is None else OWN_MODEL_TYPE
        d["architectures"] = [HF_ARCHITECTURE if reason is None else OWN_ARCHITECTURE]
        rope_parameters: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope_parameters.update(
                {("rope_type" if k == "type" else k): v for k, v in self.rope_scaling.items()}
            )
        d["rope_parameters"] = rope_parameters
        d["head_dim"] = self.qk_rope_head_dim
        d["torch_dtype"] = "float32"
        d["hf_compatible"] = reason is None
        if reason is not None:
            d["hf_incompatible_because"] = reason
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelArgs:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **kw: Any) -> ModelArgs:
        return dataclasses.replace(self, **kw)


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
        max_position_embeddings=512,
    )


PRESETS = {"tiny": _tiny, "small": _small, "seed": _seed}


def preset(name: str) -> ModelArgs:
    """A fresh ModelArgs for a named preset (tiny, small, seed)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
