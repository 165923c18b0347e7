"""Quantized weights for generation: 4/8-bit affine quantization (MLX's, as mlx-lm uses it).

- `quantize_model(model, bits, group_size)`: every Linear and Embedding (and the stacked routed
  experts) becomes its quantized twin: packed uint32 weights with a float scale and bias per
  `group_size` weights. Stacked experts run through `mx.gather_qmm` (QuantizedStackedLinear).
  Kept in float: norms, the router (MoEGate, its bias float32 as always) and MLA's kv_b_proj,
  whose two halves the absorbed decode folds into the query and output (it is small: heads *
  (d_nope + d_v) * kv_lora_rank per layer).
- `load_quantized(path)`: a directory with a `quantization` key in config.json: written by
  `python -m mlx_lm convert -q` from one of our checkpoints (experts stacked as `switch_mlp`,
  kv_b_proj split into quantized `embed_q`/`unembed_out`) or by `tools.convert --quantize`
  (our names, per-expert, kv_b_proj float). kv_b_proj is rebuilt in float from the dequantized
  halves, so the model computes with exactly mlx-lm's effective weights.
- `save_quantized(model, out, tokenizer)`: a directory that `mlx_lm.load` accepts (our HF
  names, per-expert tensors with `.scales`/`.biases`, config `quantization`).
Training on quantized weights is refused (`refuse_training`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import checkpoint as ckpt
from . import hf
from .config import ConfigError
from .model import Model

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
QUANT_KEYS = ("quantization", "quantization_config")


class QuantizeError(ValueError):
    """A quantization setting or directory this code cannot use (one line, with the fix)."""


def check_quantization(bits: Any, group_size: Any) -> None:
    if bits not in BITS:
        raise QuantizeError(f"--quantize {bits}: choose 4 or 8 (bits per weight)")
    if group_size not in GROUP_SIZES:
        raise QuantizeError(f"--group-size {group_size}: choose 32, 64 or 128")


# ------------------------------------------------------------------------- models
@dataclass(frozen=True)
class Quantization:
    """How a model's weights are quantized (kept on the model as `model.quantization`)."""

    group_size: int
    bits: int

    def to_dict(self) -> dict[str, int]:
        return {"group_size": self.group_size, "bits": self.bits}


def _keep_float(path: str) -> bool:
    return path.endswith("kv_b_proj")


def quantize_model(model: Any, bits: int, group_size: int = 64) -> Any:
    """Quantize `model` in place (see the module docstring for what stays float)."""
    check_quantization(bits, group_size)

    def pred(path: str, m: Any) -> bool:
        if _keep_float(path) or not hasattr(m, "to_quantized"):
            return False
        return m.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size, bits, class_predicate=pred)
    model.quantization = Quantization(group_size, bits)
    mx.eval(model.parameters())
    return model


def is_quantized(model: Any) -> bool:
    return getattr(model, "quantization", None) is not None


def refuse_training(model: Any) -> None:
    if is_quantized(model):
        raise QuantizeError(
            "the checkpoint holds quantized weights: training on them is not supported; "
            "train from the float checkpoint"
        )


def weight_bytes(model: Any) -> int:
    """Bytes of every parameter array (packed weights, scales and biases included)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


# ------------------------------------------------------------------------ directories
SWITCH = re.compile(
    r"^(.*\.mlp)\.switch_mlp\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$"
)
STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$")
EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(scales|biases)$")


def is_quantized_dir(config: dict[str, Any]) -> bool:
    return any(config.get(k) for k in QUANT_KEYS)


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint directory as a dict (CheckpointError if unreadable)."""
    p = ckpt.require_dir(path)
    try:
        d = json.loads((p / ckpt.CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ckpt.CheckpointError(f"{p / ckpt.CONFIG} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ckpt.CheckpointError(f"{p / ckpt.CONFIG} does not hold a JSON object")
    return d


def load_quantized(path: str | Path) -> Any:
    """Build the model of a quantized directory (mlx-lm's or ours) and load it strictly."""
    p = ckpt.require_dir(path)
    config = read_config(p)
    q = config.get("quantization") or config.get("quantization_config") or {}
    bits, group = q.get("bits"), q.get("group_size")
    if q.get("mode", "affine") != "affine" or bits not in (2, 3, 4, 5, 6, 8) or not group:
        raise QuantizeError(f"{p}: quantization {q} is not MLX affine quantization")
    try:
        args = hf.args_from_config({k: v for k, v in config.items() if k not in QUANT_KEYS})
        args.validate()
    except (ConfigError, TypeError) as e:
        raise ckpt.CheckpointError(f"{p / ckpt.CONFIG}: {e}") from None
    weights: dict[str, mx.array] = {}
    for f in ckpt.weight_files(p):
        weights.update(ckpt.read_safetensors(f))
    try:
        weights = _our_names(weights, args, group, bits)
    except hf.LayoutError as e:
        raise ckpt.CheckpointError(f"{p}: {e}") from None
    args = ckpt.fit_mtp(args, weights)
    model = Model(args)
    quantized = {k[: -len(".scales")] for k in weights if k.endswith(".scales")}

    def pred(path: str, m: Any) -> bool:
        return path in quantized and hasattr(m, "to_quantized")

    nn.quantize(model, group, bits, class_predicate=pred)
    expected = dict(tree_flatten(model.parameters()))
    ckpt.check_shapes({k: v.shape for k, v in expected.items()}, weights, str(p))
    weights = ckpt.cast_weights(weights, lambda v: v, lambda v: v.astype(mx.float32))
    model.load_weights(list(weights.items()), strict=True)
    model.quantization = Quantization(group, bits)
    mx.eval(model.parameters())
    return model


def _our_names(weights: dict[str, mx.array], args: Any, group: int, bits: int) -> dict:
    """mlx-lm's or our quantized names -> our internal ones (experts stacked, kv_b_proj float)."""
    out: dict[str, mx.array] = {}
    parts: dict[str, dict[str, mx.array]] = {}
    for k, v in weights.items():
        if (m := SWITCH.match(k)) is not None:
            out[f"{m.group(1)}.experts.{m.group(2)}.{m.group(3)}"] = v
        elif ".self_attn.embed_q." in k or ".self_attn.unembed_out." in k:
            head, part, what = k.rsplit(".", 2)
            parts.setdefault(head, {})[f"{part}.{what}"] = v
        elif k.endswith(".self_attn.kv_b_proj.weight") and v.dtype == mx.uint32:
            s, b = weights[k[:-6] + "scales"], weights[k[:-6] + "biases"]
            out[k] = mx.dequantize(v, s, b, group, bits)
        elif k.endswith(".self_attn.kv_b_proj.scales") or k.endswith(".kv_b_proj.biases"):
            continue
        else:
            out[k] = v
    for head, ps in parts.items():  # dequantize the split halves back into kv_b_proj
        for part in ("embed_q", "unembed_out"):
            w = ps[f"{part}.weight"]
            if f"{part}.scales" in ps:
                w = mx.dequantize(w, ps[f"{part}.scales"], ps[f"{part}.biases"], group, bits)
            out[f"{head}.{part}.weight"] = w
    out = hf.normalise_weights(out, args, mx.stack, lambda xs, a: mx.concatenate(xs, a))
    # per-expert scales/biases (ours, or transformers-style names) are stacked like weights
    groups: dict[str, dict[int, mx.array]] = {}
    for k in list(out):
        if (m := EXPERT.match(k)) is not None:
            groups.setdefault(f"{m.group(1)}.{m.group(3)}.{m.group(4)}", {})[int(m.group(2))] = (
                out.pop(k)
            )
    for k, per in groups.items():
        out[k] = mx.stack([per[e] for e in range(len(per))])
    return out


def save_quantized(model: Any, out: str | Path, tokenizer: Any = None) -> None:
    """Write a quantized model's files into the directory `out` (config.json with its
    `quantization`, model.safetensors with our HF names per expert, mtp.safetensors)."""
    if not is_quantized(model):
        raise QuantizeError("save_quantized: the model is not quantized")
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    per: dict[str, mx.array] = {}
    for k, v in tree_flatten(model.parameters()):  # stacked experts -> per-expert names
        m = STACKED.match(k)
        if m is None:
            per[k] = v
        else:
            for e in range(v.shape[0]):
                per[f"{m.group(1)}.{e}.{m.group(2)}.{m.group(3)}"] = v[e]
    main, mtp = ckpt.split_mtp(per)
    meta = {"format": "mlx"}
    ckpt.atomic_write(o / ckpt.WEIGHTS, lambda t: mx.save_safetensors(t, main, meta))
    if mtp:
        ckpt.atomic_write(o / ckpt.MTP, lambda t: mx.save_safetensors(t, mtp, meta))
    if tokenizer is not None:
        tokenizer.save(str(o))
    q = model.quantization.to_dict()
    config = {**hf.config_from_args(model.args), "torch_dtype": "float32"}
    ckpt.write_json(o / ckpt.CONFIG, {**config, "quantization": q, "quantization_config": q})


def write_quantized(src: str | Path, out: str | Path, bits: int, group_size: int = 64) -> Any:
    """Our float checkpoint -> a quantized directory that mlx_lm.load and our load() read
    (tokenizer files copied). Refuses configs with no Hugging Face deepseek_v3 form."""
    check_quantization(bits, group_size)
    src_p = ckpt.require_dir(src)
    reason = hf.hf_incompatibility(ckpt.load_args(src_p))
    if reason is not None:
        raise ckpt.CheckpointError(f"{src_p} has no Hugging Face deepseek_v3 form: {reason}")
    model = quantize_model(ckpt.load_model(src_p), bits, group_size)

    def fill(tmp: Path) -> None:
        save_quantized(model, tmp)
        ckpt.copy_side_files(src_p, tmp)

    ckpt.write_dir(Path(out), fill, stale=(ckpt.MTP, ckpt.INDEX))
    return model
