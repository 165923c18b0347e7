"""Model configuration as data: the `ModelArgs` dataclass and its validation rules.

Stdlib only (no MLX import) so the PyTorch twin and the tools can import it cheaply.
Every default lives here, each field with its help text (`field(metadata={"help": ...})`).
Field names are the Hugging Face `deepseek_v3` keys plus our own extras; how config.json is
written and read (HF key translation, which configs have an HF form) lives in `hf.py`, the
file itself in `checkpoint.py`; the named presets in `presets.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration value; the message is one line naming the key and the fix."""


# config.json `model_type`: the Hugging Face family when the config has a deepseek_v3 form, else
# our own name, so that mlx-lm and transformers refuse the directory ("model type mlx_deepseek
# not supported") instead of loading different weights or silently computing something else.
HF_MODEL_TYPE = "deepseek_v3"
OWN_MODEL_TYPE = "mlx_deepseek"


def help_field(default: Any, help: str) -> Any:  # noqa: A002  (the argparse word)
    """A dataclass field with its help text (read by `--help` of the CLIs)."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelArgs:
    """Architecture of the DeepSeek-style model; `help(ModelArgs)` or `field_help()` lists
    every field. Fields up to eos_token_id are Hugging Face `deepseek_v3` keys; the rest are
    our own (mlx-lm and transformers ignore them)."""

    model_type: str = help_field(HF_MODEL_TYPE, "model family; only deepseek_v3")
    vocab_size: int = help_field(4096, "token vocabulary size")
    hidden_size: int = help_field(256, "model width")
    intermediate_size: int = help_field(768, "hidden width of the dense SwiGLU MLP (first layers)")
    moe_intermediate_size: int = help_field(
        256, "hidden width of each routed expert (shared experts: times n_shared_experts)"
    )
    num_hidden_layers: int = help_field(4, "number of transformer blocks")
    num_attention_heads: int = help_field(4, "attention heads")
    num_key_value_heads: int = help_field(4, "key/value heads (= num_attention_heads for MLA)")
    q_lora_rank: int | None = help_field(
        None, "null: plain q_proj; else q_a_proj -> RMSNorm -> q_b_proj of this rank"
    )
    kv_lora_rank: int = help_field(64, "width of the cached latent c_kv (MLA)")
    qk_nope_head_dim: int = help_field(32, "per-head query/key width without RoPE (MLA)")
    qk_rope_head_dim: int = help_field(16, "per-head query/key width with RoPE (MLA)")
    v_head_dim: int = help_field(32, "per-head value width (MLA)")
    n_routed_experts: int = help_field(8, "routed experts per MoE layer (0 = dense model)")
    n_shared_experts: int = help_field(1, "shared experts per MoE layer")
    num_experts_per_tok: int = help_field(2, "routed experts per token (top-k)")
    n_group: int = help_field(1, "expert groups for group-limited routing")
    topk_group: int = help_field(1, "groups kept per token (group-limited routing)")
    first_k_dense_replace: int = help_field(1, "the first k layers use the dense MLP")
    norm_topk_prob: bool = help_field(True, "normalise the top-k routing weights to sum to 1")
    routed_scaling_factor: float = help_field(1.0, "scale of the routed experts' output")
    scoring_func: str = help_field(
        "sigmoid", "router scores: sigmoid (V3) or softmax (V2 / the seed)"
    )
    topk_method: str = help_field(
        "noaux_tc", "expert choice: noaux_tc (top-k of score + routing bias)"
    )
    moe_layer_freq: int = help_field(1, "every k-th layer (past the dense ones) is MoE")
    rms_norm_eps: float = help_field(1e-6, "epsilon of the norms")
    attention_bias: bool = help_field(False, "biases in the attention projections (unsupported)")
    hidden_act: str = help_field("silu", "MLP activation (only silu)")
    tie_word_embeddings: bool = help_field(False, "share embedding and output head (unsupported)")
    max_position_embeddings: int = help_field(512, "longest sequence (RoPE table size)")
    rope_theta: float = help_field(10000.0, "RoPE base")
    rope_scaling: dict | None = help_field(None, "RoPE scaling (YaRN) dict; unsupported, keep null")
    rope_interleave: bool = help_field(True, "interleaved RoPE, as DeepSeek (only true)")
    num_nextn_predict_layers: int = help_field(0, "multi-token prediction depth D (0 = off)")
    bos_token_id: int | None = help_field(None, "beginning-of-text token id")
    eos_token_id: int | None = help_field(None, "end-of-text token id")
    # --- our own keys (ignored by mlx-lm and transformers) ---
    attention_type: str = help_field(
        "mla",
        "mla (Multi-head Latent Attention) or mqa (the seed's multi-query attention: one K/V "
        "head of width hidden_size / heads, standard RoPE)",
    )
    norm_type: str = help_field("rmsnorm", "rmsnorm or layernorm (the seed's pre-LayerNorm)")
    bias_update_speed: float = help_field(
        0.03,
        "gamma of the auxiliary-loss-free routing-bias update (0 = off; DeepSeek-V3 used 0.001 "
        "with the sign rule over ~10^5 steps, too slow for runs of hundreds of steps)",
    )
    bias_update_rule: str = help_field(
        "relative",
        "relative: b_i += gamma * (mean - c_i) / mean (fast while an expert is overloaded, "
        "quiet near balance); sign: b_i += gamma * sign(mean - c_i) (DeepSeek-V3)",
    )
    balance_loss_alpha: float = help_field(1e-4, "weight of the sequence-wise balance loss")
    capacity_factor: float = help_field(
        0.0,
        "0 = no dropping; else each expert takes at most ceil(cf * k * T / E) tokens of each "
        "sequence (earlier tokens first) in training",
    )
    mtp_loss_weight: float = help_field(0.3, "lambda of the MTP loss (divided by D)")
    init_std: float = help_field(0.02, "standard deviation of the random weight initialisation")

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        """Query/key width per head: nope + rope for MLA, hidden/heads for MQA."""
        if self.attention_type == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        """Width that RoPE rotates: qk_rope_head_dim (MLA) or the whole head (MQA)."""
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

    # --------------------------------------------------------------- validation
    def validate(self) -> ModelArgs:
        """Raise ConfigError (one line) on the first rule of RULES this config breaks."""
        for rule in RULES:
            if not rule.ok(self):
                raise ConfigError(rule.message(self))
        return self

    # ------------------------------------------------------------ serialisation
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        """Build from a dict of our field names (unknown keys ignored). For a config.json,
        which may hold Hugging Face spellings, use `hf.args_from_config`."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (config.json adds the HF keys: `hf.config_from_args`)."""
        return dataclasses.asdict(self)

    def replace(self, **kw: Any) -> ModelArgs:
        return dataclasses.replace(self, **kw)


def field_help() -> dict[str, str]:
    """Field name -> help text, for CLIs that expose the fields as flags."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(ModelArgs)}


# ------------------------------------------------------------------- validation
BIAS_UPDATE_RULES = ("sign", "relative")


@dataclass(frozen=True)
class Rule:
    """One validation rule: `ok(args)` must hold, else `why` (formatted with a=args) is the fix."""

    key: str
    ok: Callable[[ModelArgs], bool]
    why: str

    def message(self, a: ModelArgs) -> str:
        return f"invalid config: {self.key}={getattr(a, self.key)!r}: {self.why.format(a=a)}"


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive(key: str, when: Callable[[ModelArgs], bool] = lambda a: True) -> Rule:
    return Rule(
        key, lambda a: not when(a) or _pos_int(getattr(a, key)), "must be a positive integer"
    )


def _mla(a: ModelArgs) -> bool:
    return a.attention_type == "mla"


def _moe(a: ModelArgs) -> bool:
    return a.n_routed_experts > 0


def _per_group(a: ModelArgs) -> int:
    return a.n_routed_experts // a.n_group


# In order: the first broken rule is reported. Conditions on other fields (MLA, MoE) come first
# in each lambda, so that a rule only applies where its field means something.
RULES: tuple[Rule, ...] = (
    *(
        _positive(k)
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        )
    ),
    *(
        _positive(k, _mla)
        for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    ),
    *(
        _positive(k, _moe)
        for k in ("moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group")
    ),
    Rule(
        "model_type",
        lambda a: a.model_type in (HF_MODEL_TYPE, OWN_MODEL_TYPE),
        f"only {HF_MODEL_TYPE!r} (or our {OWN_MODEL_TYPE!r}) is supported",
    ),
    Rule("attention_type", lambda a: a.attention_type in ("mla", "mqa"), "choose 'mla' or 'mqa'"),
    Rule(
        "norm_type",
        lambda a: a.norm_type in ("rmsnorm", "layernorm"),
        "choose 'rmsnorm' or 'layernorm'",
    ),
    Rule(
        "scoring_func",
        lambda a: a.scoring_func in ("sigmoid", "softmax"),
        "choose 'sigmoid' or 'softmax'",
    ),
    Rule(
        "q_lora_rank",
        lambda a: a.q_lora_rank is None or _pos_int(a.q_lora_rank),
        "must be null or a positive integer",
    ),
    Rule(
        "qk_rope_head_dim",
        lambda a: not _mla(a) or a.qk_rope_head_dim % 2 == 0,
        "RoPE needs an even width",
    ),
    Rule(
        "num_key_value_heads",
        lambda a: not _mla(a) or a.num_key_value_heads == a.num_attention_heads,
        "MLA needs num_key_value_heads == num_attention_heads",
    ),
    Rule(
        "num_attention_heads",
        lambda a: _mla(a) or a.hidden_size % a.num_attention_heads == 0,
        "must divide hidden_size {a.hidden_size}",
    ),
    Rule(
        "hidden_size",
        lambda a: _mla(a) or a.head_dim % 2 == 0,
        "hidden_size / num_attention_heads must be even for RoPE",
    ),
    Rule(
        "n_routed_experts",
        lambda a: isinstance(a.n_routed_experts, int) and a.n_routed_experts >= 0,
        "must be >= 0 (0 = dense model)",
    ),
    Rule("n_shared_experts", lambda a: a.n_shared_experts >= 0, "must be >= 0"),
    Rule(
        "num_experts_per_tok",
        lambda a: not _moe(a) or a.num_experts_per_tok <= a.n_routed_experts,
        "top-k must be <= n_routed_experts ({a.n_routed_experts})",
    ),
    Rule(
        "n_group",
        lambda a: not _moe(a) or a.n_routed_experts % a.n_group == 0,
        "must divide n_routed_experts ({a.n_routed_experts})",
    ),
    Rule(
        "topk_group",
        lambda a: not _moe(a) or a.topk_group <= a.n_group,
        "must be <= n_group ({a.n_group})",
    ),
    Rule(
        "n_group",
        lambda a: not _moe(a) or a.n_group == 1 or _per_group(a) >= 2,
        "each group needs >= 2 experts (group score is a top-2 sum)",
    ),
    Rule(
        "topk_group",
        lambda a: not _moe(a) or a.topk_group * _per_group(a) >= a.num_experts_per_tok,
        "kept groups hold fewer experts than num_experts_per_tok",
    ),
    Rule("first_k_dense_replace", lambda a: a.first_k_dense_replace >= 0, "must be >= 0"),
    Rule("moe_layer_freq", lambda a: a.moe_layer_freq >= 1, "must be >= 1"),
    Rule(
        "capacity_factor", lambda a: a.capacity_factor >= 0, "must be >= 0 (0 = no token dropping)"
    ),
    Rule("bias_update_speed", lambda a: a.bias_update_speed >= 0, "must be >= 0"),
    Rule(
        "bias_update_rule",
        lambda a: a.bias_update_rule in BIAS_UPDATE_RULES,
        "choose 'sign' or 'relative'",
    ),
    Rule("balance_loss_alpha", lambda a: a.balance_loss_alpha >= 0, "must be >= 0"),
    Rule("mtp_loss_weight", lambda a: a.mtp_loss_weight >= 0, "must be >= 0"),
    Rule("num_nextn_predict_layers", lambda a: a.num_nextn_predict_layers >= 0, "must be >= 0"),
    Rule("routed_scaling_factor", lambda a: a.routed_scaling_factor > 0, "must be > 0"),
    Rule("rms_norm_eps", lambda a: a.rms_norm_eps > 0, "must be > 0"),
    Rule("rope_theta", lambda a: a.rope_theta > 0, "must be > 0"),
    Rule(
        "tie_word_embeddings",
        lambda a: not a.tie_word_embeddings,
        "the output head is untied; set false",
    ),
    Rule("attention_bias", lambda a: not a.attention_bias, "not supported; set false"),
    Rule(
        "rope_scaling",
        lambda a: a.rope_scaling is None,
        "RoPE scaling (YaRN) is not implemented here; remove it (null)",
    ),
    Rule(
        "hidden_act",
        lambda a: a.hidden_act == "silu",
        "only 'silu' (SwiGLU experts) is implemented",
    ),
    Rule(
        "topk_method",
        lambda a: a.topk_method == "noaux_tc",
        "only 'noaux_tc' (top-k of scores + routing bias) is implemented",
    ),
    Rule(
        "rope_interleave",
        lambda a: a.rope_interleave,
        "only interleaved RoPE is supported (as in mlx-lm)",
    ),
)
