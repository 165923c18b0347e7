"""Hugging Face interop: read `deepseek_v3` directories written by transformers, mlx-lm or us.

Our checkpoint directory already is a Hugging Face `deepseek_v3` one when the config has that
form (SPEC sections 1-2). Other writers differ only in how tensors are laid out on disk:
- transformers 5 `save_pretrained`: per-expert names, like ours; one file or shards listed in
  `model.safetensors.index.json`; float32, bfloat16 or float16 (router kept in float32).
- a raw transformers `state_dict()`: experts fused, `mlp.experts.gate_up_proj` [E, 2I, H]
  (gate rows first) and `mlp.experts.down_proj` [E, H, I].
- mlx-lm (`mlx_lm.convert`, `save_model`): experts stacked as `mlp.switch_mlp.*_proj.weight`
  [E, out, in], and `kv_b_proj` split into `embed_q` [H, r, d_nope] / `unembed_out` [H, d_v, r].
- DeepSeek's multi-token-prediction layers as `model.layers.{num_hidden_layers + k}.*`.
`normalise_weights` maps all of these onto our internal names (experts stacked, MTP under
`mtp.{k}`); quantized checkpoints are refused, since the model here holds dense weights.
`export_hf` / `import_hf` back `python -m tools.convert --to-hf / --from-hf`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, load_args, load_model, require_dir, save_model
from .config import ModelArgs

INDEX = "model.safetensors.index.json"
# Files besides the weights that make a directory usable by tokenizers and generators.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
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
SWITCH = re.compile(r"^(.*\.mlp)\.switch_mlp\.(gate_proj|up_proj|down_proj)\.weight$")
FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


# --------------------------------------------------------------------------- files
def weight_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards its index lists (all must exist), plus mtp.safetensors."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{index} is not a valid shard index ({e!r}); re-save the checkpoint"
            ) from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(
                    f"{path}: {INDEX} lists {f.name}, which is missing; copy every shard"
                )
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("model-*-of-*.safetensors"))
        counts = {re.sub(r".*-of-(\d+)\.safetensors$", r"\1", f.name) for f in files}
        if len(counts) == 1 and len(files) != int(counts.pop()):
            raise CheckpointError(
                f"{path}: found {len(files)} of the model-*-of-* shards; copy every shard"
            )
    if not files:
        raise CheckpointError(
            f"{path} has no model.safetensors (nor shards with {INDEX}): no weights to load"
        )
    if (path / "mtp.safetensors").is_file():
        files.append(path / "mtp.safetensors")
    return files


def check_not_quantized(config: dict[str, Any], where: str) -> None:
    """Refuse configs that declare quantized weights (mlx-lm, GPTQ/AWQ, fp8, ...)."""
    for key in ("quantization", "quantization_config"):
        if config.get(key):
            raise CheckpointError(
                f"{where}: config.json has {key!r}: quantized checkpoints are not supported; "
                "use the unquantized (float) weights"
            )


def check_weights_not_quantized(weights: dict[str, Any], where: str) -> None:
    """Refuse quantized tensors: scale/zero-point companions or integer/fp8 weights."""
    for k, v in weights.items():
        if k.endswith(QUANT_SUFFIXES):
            raise CheckpointError(
                f"{where}: tensor {k} belongs to a quantized weight; use the unquantized weights"
            )
        dtype = str(getattr(v, "dtype", "")).replace("mlx.core.", "")
        if dtype and not dtype.startswith(("float", "bfloat")):
            raise CheckpointError(
                f"{where}: weight {k} is {dtype}: quantized checkpoints are not supported"
            )


# ---------------------------------------------------------------------------- names
def normalise_weights(
    weights: dict[str, Any],
    args: ModelArgs,
    stack: Callable[[list], Any],
    concat: Callable[..., Any],
) -> tuple[dict[str, Any], ModelArgs]:
    """Any supported on-disk layout -> (our internal names, args adjusted for what was there).

    Result: per-expert names still per expert (checkpoint.stack_experts stacks them);
    mlx-lm's stacked `switch_mlp` and transformers' fused experts become our stacked names;
    `embed_q`/`unembed_out` become `kv_b_proj`; HF MTP layers become `mtp.{k}.*` when they
    match num_nextn_predict_layers, else they are dropped with num_nextn_predict_layers 0.
    `stack` is mx.stack (or np.stack); `concat(list, axis)` is mx.concatenate (or np's).
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
            raise CheckpointError(
                f"missing weight {prefix}{part}.weight (mlx-lm's split of kv_b_proj)"
            )
        r, d_v = args.kv_lora_rank, args.v_head_dim
        for part, w, want in (
            ("embed_q", embed_q[prefix], (H, r, d_n)),
            ("unembed_out", unembed[prefix], (H, d_v, r)),
        ):
            if tuple(w.shape) != want:
                raise CheckpointError(
                    f"weight {prefix}{part}.weight has shape {tuple(w.shape)}, config.json implies {want}"
                )
        w = concat([embed_q[prefix].swapaxes(-1, -2), unembed[prefix]], 1)  # [H, d_n + d_v, r]
        out[prefix + "kv_b_proj.weight"] = w.reshape(H * (d_n + d_v), r)
    if mtp_layers:
        if sorted(mtp_layers) == list(range(args.num_nextn_predict_layers)):
            for depth, layer in mtp_layers.items():
                out.update(_mtp_from_hf(depth, layer, concat))
        else:  # layers we cannot place: drop them, decode does not need them
            args = args.replace(num_nextn_predict_layers=0)
    return out, args


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


# ------------------------------------------------------------------- directories
def _copy_side_files(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _write_dir(out: Path, fill: Callable[[Path], None]) -> None:
    """Build the directory in a temporary sibling, then move its files into `out`."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}", dir=out.parent))
    try:
        fill(tmp)
        out.mkdir(exist_ok=True)
        for stale in ("mtp.safetensors", INDEX):  # would not match the new weights
            if not (tmp / stale).exists() and (out / stale).exists():
                (out / stale).unlink()
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _resave(src: Path, out: Path, dtype: Any) -> Any:
    """Load `src` (any supported layout), write it as our directory at `out` with its tokenizer."""
    model = load_model(src, dtype=dtype)

    def fill(tmp: Path) -> None:
        save_model(tmp, model)
        _copy_side_files(src, tmp)

    _write_dir(out, fill)
    return model


def import_hf(src: str | Path, out: str | Path, dtype: Any = None) -> Any:
    """A Hugging Face deepseek_v3 directory (any layout above) -> our checkpoint directory.

    Returns the loaded MLX model. The tokenizer and generation files are copied.
    """
    return _resave(require_dir(src), Path(out), dtype)


def export_hf(src: str | Path, out: str | Path, dtype: Any = None) -> Any:
    """Our checkpoint -> a directory that transformers and mlx-lm load (model, config,
    tokenizer; no optimizer or trainer state). Raises CheckpointError when the config has
    no deepseek_v3 form, naming why."""
    src_p = require_dir(src)
    reason = load_args(src_p).hf_incompatibility()
    if reason is not None:
        raise CheckpointError(f"{src_p} cannot be exported as Hugging Face deepseek_v3: {reason}")
    return _resave(src_p, Path(out), dtype)
