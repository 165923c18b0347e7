"""Hugging Face interop as pure mapping: our names and config <-> other libraries' layouts.

No file access here (`checkpoint.py` reads and writes directories and calls these functions).
Our checkpoint directory already is a Hugging Face `deepseek_v3` one when the config has that
form (SPEC sections 1-2). Other writers differ only in how tensors are laid out:
- transformers 5 `save_pretrained`: per-expert names, like ours (float32, bfloat16 or float16,
  router kept in float32);
- a raw transformers `state_dict()`: experts fused, `mlp.experts.gate_up_proj` [E, 2I, H]
  (gate rows first) and `mlp.experts.down_proj` [E, H, I];
- mlx-lm (`mlx_lm.convert`, `save_model`): experts stacked as `mlp.switch_mlp.*_proj.weight`
  [E, out, in], and `kv_b_proj` split into `embed_q` [H, r, d_nope] / `unembed_out` [H, d_v, r];
- DeepSeek's multi-token-prediction layers as `model.layers.{num_hidden_layers + k}.*`.
`normalise_weights` maps all of these onto our internal names (experts stacked, MTP under
`mtp.{k}`); `unstack_experts` gives the per-expert names we write. `config_from_args` /
`args_from_config` translate config.json (rope_parameters, nulls, model_type), and
`hf_incompatibility` says why a config has no `deepseek_v3` form. Quantized layouts are refused
(LayoutError), since the model here holds dense weights.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from .config import HF_MODEL_TYPE, OWN_MODEL_TYPE, ModelArgs

HF_ARCHITECTURE = "DeepseekV3ForCausalLM"
OWN_ARCHITECTURE = "MlxDeepseekForCausalLM"
# Keys config.json holds besides the ModelArgs fields (read back, they are ignored or translated).
CONFIG_EXTRAS = (
    "architectures",
    "rope_parameters",
    "head_dim",
    "torch_dtype",
    "hf_compatible",
    "hf_incompatible_because",
)
QUANT_SUFFIXES = (
    ".scales",
    ".biases",
    ".weight_scale_inv",
    ".weight_scale",
    ".qweight",
    ".qzeros",
    ".g_idx",
    ".weight_packed",
    ".weight_shape",
)
EXPERT_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.weight$")
EXPERT_SINGLE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
SWITCH = re.compile(r"^(.*\.mlp)\.switch_mlp\.(gate_proj|up_proj|down_proj)\.weight$")
FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


class LayoutError(ValueError):
    """A layout or config this mapping cannot express; the message names the key and the fix."""


# --------------------------------------------------------------------------- config
def hf_incompatibility(args: ModelArgs) -> str | None:
    """Why `args` has no Hugging Face `deepseek_v3` form, or None if it has one."""
    moe = args.n_routed_experts > 0
    reasons = [
        why
        for broken, why in (
            (args.attention_type != "mla", "attention_type 'mqa' (deepseek_v3 only has MLA)"),
            (args.norm_type != "rmsnorm", "norm_type 'layernorm' (deepseek_v3 only has RMSNorm)"),
            (
                moe and args.scoring_func != "sigmoid",
                "scoring_func 'softmax' (deepseek_v3 uses sigmoid with noaux_tc)",
            ),
            (
                moe and args.capacity_factor > 0,
                "capacity_factor > 0 (deepseek_v3 never drops tokens)",
            ),
            (
                moe and args.n_shared_experts < 1,
                "n_shared_experts 0 (the format needs >= 1 shared expert)",
            ),
            (
                not moe,
                "n_routed_experts 0 (deepseek_v3 layers past first_k_dense are MoE)",
            ),
            (
                moe and args.moe_layer_freq != 1,
                "moe_layer_freq != 1 (transformers makes every layer past first_k_dense MoE)",
            ),
            (
                moe and args.num_experts_per_tok == 1 and args.norm_topk_prob,
                "num_experts_per_tok 1 with norm_topk_prob true (mlx-lm and transformers "
                "disagree; use k >= 2 or norm_topk_prob false)",
            ),
        )
        if broken
    ]
    return "; ".join(reasons) or None


def config_from_args(args: ModelArgs) -> dict[str, Any]:
    """config.json contents: our fields plus the keys HF tools read (SPEC section 1).

    A config with a Hugging Face form gets model_type deepseek_v3; any other gets
    model_type mlx_deepseek (with hf_compatible false and the reason), which only this
    package loads: mlx-lm and transformers refuse it instead of computing something else.
    """
    d = args.to_dict()
    reason = hf_incompatibility(args)
    d["model_type"] = HF_MODEL_TYPE if reason is None else OWN_MODEL_TYPE
    d["architectures"] = [HF_ARCHITECTURE if reason is None else OWN_ARCHITECTURE]
    rope_parameters: dict[str, Any] = {"rope_theta": args.rope_theta, "rope_type": "default"}
    if args.rope_scaling:
        rope_parameters.update(
            {("rope_type" if k == "type" else k): v for k, v in args.rope_scaling.items()}
        )
    d["rope_parameters"] = rope_parameters
    d["head_dim"] = args.qk_rope_head_dim
    d["torch_dtype"] = "float32"
    d["hf_compatible"] = reason is None
    if reason is not None:
        d["hf_incompatible_because"] = reason
    return d


def args_from_config(d: dict[str, Any]) -> ModelArgs:
    """ModelArgs (not validated) from a config.json dict: ours, transformers' or mlx-lm's."""
    names = {f.name for f in dataclasses.fields(ModelArgs)}
    kw = {k: v for k, v in d.items() if k in names}
    if kw.get("model_type") == OWN_MODEL_TYPE:
        kw["model_type"] = HF_MODEL_TYPE  # same model; the name only makes other tools refuse it
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
    if d.get("rope_scaling") is None and rp.get("rope_type", "default") not in ("default", None):
        kw["rope_scaling"] = {
            ("type" if k == "rope_type" else k): v for k, v in rp.items() if k != "rope_theta"
        }
    rs = kw.get("rope_scaling")
    if isinstance(rs, dict) and rs.get("type", rs.get("rope_type")) == "default":
        kw["rope_scaling"] = None  # {"type": "default"} means no scaling
    for key in ("eos_token_id", "bos_token_id"):
        if isinstance(kw.get(key), list):
            kw[key] = kw[key][0] if kw[key] else None
    return ModelArgs(**kw)


def check_not_quantized(config: dict[str, Any]) -> None:
    """Refuse configs that declare quantized weights (mlx-lm, GPTQ/AWQ, fp8, ...)."""
    for key in ("quantization", "quantization_config"):
        if config.get(key):
            raise LayoutError(
                f"config.json has {key!r}: quantized weights serve generation only "
                "(mlx_model.generate, load()); training and conversion need the float weights"
            )


def check_weights_not_quantized(weights: dict[str, Any]) -> None:
    """Refuse quantized tensors: scale/zero-point companions or integer/fp8 weights."""
    for k, v in weights.items():
        if k.endswith(QUANT_SUFFIXES):
            raise LayoutError(
                f"tensor {k} belongs to a quantized weight; use the unquantized weights"
            )
        dtype = str(getattr(v, "dtype", "")).replace("mlx.core.", "")
        if dtype and not dtype.startswith(("float", "bfloat")):
            raise LayoutError(f"weight {k} is {dtype}: quantized checkpoints are not supported")


# ------------------------------------------------------------------------ experts
def unstack_experts(weights: dict[str, Any]) -> dict[str, Any]:
    """Internal stacked experts [E, out, in] -> per-expert HF names `...experts.{e}.*.weight`."""
    out = {}
    for name, w in weights.items():
        m = EXPERT_STACKED.match(name)
        if m is None:
            out[name] = w
            continue
        for e in range(w.shape[0]):
            out[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = w[e]
    return out


def stack_experts(weights: dict[str, Any], stack: Callable[[list], Any]) -> dict[str, Any]:
    """Per-expert HF names -> internal stacked [E, out, in] (`stack` is np.stack, mx.stack, ...)."""
    out: dict[str, Any] = {}
    groups: dict[str, dict[int, Any]] = {}
    for name, w in weights.items():
        m = EXPERT_SINGLE.match(name)
        if m is None:
            out[name] = w
            continue
        groups.setdefault(f"{m.group(1)}.{m.group(3)}.weight", {})[int(m.group(2))] = w
    for name, per in groups.items():
        if sorted(per) != list(range(len(per))):
            raise LayoutError(f"{name}: expert indices {sorted(per)} are not 0..{len(per) - 1}")
        out[name] = stack([per[e] for e in range(len(per))])
    return out


# ------------------------------------------------------------------------ layouts
def normalise_weights(
    weights: dict[str, Any],
    args: ModelArgs,
    stack: Callable[[list], Any],
    concat: Callable[..., Any],
) -> dict[str, Any]:
    """Any supported layout -> our internal names, experts stacked [E, out, in].

    Per-expert names are stacked; mlx-lm's `switch_mlp` and transformers' fused experts become
    our stacked names; `embed_q`/`unembed_out` become `kv_b_proj`; HF MTP layers become
    `mtp.{k}.*` when they match num_nextn_predict_layers, else they are dropped (the reader
    then sees no MTP weights). `stack` is mx.stack (or np.stack); `concat(list, axis)` is
    mx.concatenate (or np's).
    """
    out: dict[str, Any] = {}
    H, d_n = args.num_attention_heads, args.qk_nope_head_dim
    mtp_layers: dict[int, dict[str, Any]] = {}
    embed_q: dict[str, Any] = {}
    unembed: dict[str, Any] = {}
    for k, v in weights.items():
        if "rotary_emb.inv_freq" in k:
            continue  # a RoPE table some exporters keep; never a parameter here
        m = LAYER.match(k)
        if m and int(m.group(1)) >= args.num_hidden_layers:
            mtp_layers.setdefault(int(m.group(1)) - args.num_hidden_layers, {})[m.group(2)] = v
            continue
        if (m := SWITCH.match(k)) is not None:  # mlx-lm: stacked [E, out, in] already
            out[f"{m.group(1)}.experts.{m.group(2)}.weight"] = v
        elif (m := FUSED.match(k)) is not None:  # transformers in memory: fused, no .weight
            if m.group(2) == "down_proj":
                out[f"{m.group(1)}.down_proj.weight"] = v  # [E, H, I] = [E, out, in]
            else:
                inter = v.shape[1] // 2  # [E, 2I, H]: gate rows, then up rows
                out[f"{m.group(1)}.gate_proj.weight"] = v[:, :inter]
                out[f"{m.group(1)}.up_proj.weight"] = v[:, inter:]
        elif k.endswith(".self_attn.embed_q.weight"):
            embed_q[k[: -len("embed_q.weight")]] = v
        elif k.endswith(".self_attn.unembed_out.weight"):
            unembed[k[: -len("unembed_out.weight")]] = v
        else:
            out[k] = v
    for prefix in sorted(set(embed_q) | set(unembed)):
        if prefix not in embed_q or prefix not in unembed:
            part = "embed_q" if prefix not in embed_q else "unembed_out"
            raise LayoutError(f"missing weight {prefix}{part}.weight (mlx-lm's split of kv_b_proj)")
        r, d_v = args.kv_lora_rank, args.v_head_dim
        for part, w, want in (
            ("embed_q", embed_q[prefix], (H, r, d_n)),
            ("unembed_out", unembed[prefix], (H, d_v, r)),
        ):
            if tuple(w.shape) != want:
                raise LayoutError(
                    f"weight {prefix}{part}.weight has shape {tuple(w.shape)}, config.json implies {want}"
                )
        w = concat([embed_q[prefix].swapaxes(-1, -2), unembed[prefix]], 1)  # [H, d_n + d_v, r]
        out[prefix + "kv_b_proj.weight"] = w.reshape(H * (d_n + d_v), r)
    if mtp_layers:
        if sorted(mtp_layers) == list(range(args.num_nextn_predict_layers)):
            for depth, layer in mtp_layers.items():
                out.update(_mtp_from_hf(depth, layer, concat))
        # else: layers we cannot place are dropped; decoding does not need them
    return stack_experts(out, stack)


def _mtp_from_hf(depth: int, layer: dict[str, Any], concat: Callable[..., Any]) -> dict[str, Any]:
    """DeepSeek MTP layer `model.layers.{N + depth}.*` -> our `mtp.{depth}.*`.

    Theirs: eh_proj([enorm(emb); hnorm(h)]), the block's weights at layer level,
    shared_head.norm, and copies of the shared embedding/head (dropped). Ours concatenates
    [hnorm(h); enorm(emb)], so eh_proj's two input halves swap.
    """
    out = {}
    for k, v in layer.items():
        if k.startswith(("embed_tokens.", "shared_head.head.")):
            continue
        if k == "eh_proj.weight":
            half = v.shape[1] // 2
            v = concat([v[:, half:], v[:, :half]], 1)
            out[f"mtp.{depth}.eh_proj.weight"] = v
        elif k.startswith(("enorm.", "hnorm.")):
            out[f"mtp.{depth}.{k}"] = v
        elif k.startswith("shared_head.norm."):
            out[f"mtp.{depth}.norm.{k[len('shared_head.norm.') :]}"] = v
        else:
            out[f"mtp.{depth}.block.{k}"] = v
    return out
