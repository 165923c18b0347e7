"""Checkpoint directories, shared by training, generation, evaluation and the tools.

A checkpoint is a Hugging Face-style directory (a valid HF `deepseek_v3` one whenever the config
has that form; otherwise config.json says model_type mlx_deepseek and why, see config.py):
    config.json          ModelArgs.to_dict() (deepseek_v3 keys + our extras)
    model.safetensors    weights under SPEC section 2 names, routed experts per expert
    mtp.safetensors      multi-token-prediction modules (kept out of model.safetensors so that
                         mlx-lm's strict loader and transformers accept the directory)
    tokenizer.json (+ tokenizer_config.json) or tokenizer.model
    optimizer.safetensors, trainer_state.json   (training outputs only)
    metrics.jsonl        appended by the trainer
Every file is written to a temporary name and moved into place with os.replace, weights first
and trainer_state.json last, so a crash mid-save leaves the previous files loadable.
`load_model` also reads directories written by transformers and mlx-lm (sharded, bfloat16,
stacked or fused experts, MTP layers): the layout differences live in `hf.py`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .config import HF_MODEL_TYPE, OWN_MODEL_TYPE, ConfigError, ModelArgs

EXPERT_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.weight$")
EXPERT_SINGLE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """A missing, truncated or mismatched checkpoint; the message names the problem and fix."""


# ----------------------------------------------------------------------------- names
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
            raise CheckpointError(f"{name}: expert indices {sorted(per)} are not 0..{len(per) - 1}")
        out[name] = stack([per[e] for e in range(len(per))])
    return out


def split_mtp(weights: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(main weights, mtp.* weights)."""
    main = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
    return main, {k: v for k, v in weights.items() if k.startswith("mtp.")}


# ------------------------------------------------------------------------- file I/O
def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), fsync, then os.replace onto path."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_numpy_safetensors(
    path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None
) -> None:
    from safetensors.numpy import save_file

    atomic_write(
        path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
    )


def write_json(path: Path, obj: Any) -> None:
    def w(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(obj, indent=2) + "\n")

    atomic_write(path, w)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Load a safetensors file as numpy (bfloat16 via mlx, which numpy lacks)."""
    try:
        import mlx.core as mx

        return {k: v for k, v in mx.load(str(path)).items()}  # type: ignore[misc]
    except Exception as e:  # truncated or not a safetensors file
        raise CheckpointError(
            f"cannot read {path}: {e}; the file is damaged, re-save or re-download it"
        ) from None


def require_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(
            f"{p} is not a directory: pass a checkpoint directory written by mlx_model.train"
        )
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p} has no config.json: it is not a checkpoint directory")
    return p


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint directory as a dict (CheckpointError if absent or invalid)."""
    p = require_dir(path)
    try:
        d = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{p / 'config.json'} does not hold a JSON object")
    return d


def load_args(path: str | Path) -> ModelArgs:
    """ModelArgs of a checkpoint directory (ours, or a Hugging Face deepseek_v3 one)."""
    from .hf import check_not_quantized

    p = Path(path)
    d = read_config(p)
    if d.get("model_type") not in (HF_MODEL_TYPE, OWN_MODEL_TYPE):
        raise CheckpointError(
            f"{p}: model_type {d.get('model_type')!r} is not supported; only {HF_MODEL_TYPE} "
            f"checkpoints (and our {OWN_MODEL_TYPE}) load here"
        )
    check_not_quantized(d, str(p))
    try:
        return ModelArgs.from_dict(d).validate()
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{p / 'config.json'}: {e}") from None


# ------------------------------------------------------------------------ MLX models
def save_model(out_dir: str | Path, model: Any, tokenizer: Any = None) -> None:
    """Write config.json, model.safetensors (HF names), mtp.safetensors and the tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    main, mtp = split_mtp(unstack_experts(dict(tree_flatten(model.parameters()))))
    meta = {"format": "pt"}
    atomic_write(out / "model.safetensors", lambda t: mx.save_safetensors(t, main, metadata=meta))
    if mtp:
        atomic_write(out / "mtp.safetensors", lambda t: mx.save_safetensors(t, mtp, metadata=meta))
    elif (out / "mtp.safetensors").exists():
        (out / "mtp.safetensors").unlink()
    if tokenizer is not None:
        tokenizer.save(str(out))
    if (out / "model.safetensors.index.json").exists():  # a stale shard index would win
        (out / "model.safetensors.index.json").unlink()
    config = model.args.to_dict()
    config["torch_dtype"] = str(model.lm_head.weight.dtype).replace("mlx.core.", "")
    write_json(out / "config.json", config)


def check_shapes(expected: dict[str, tuple], got: dict[str, Any], where: str) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped tensor."""
    for k in sorted(expected):
        if k not in got:
            raise CheckpointError(
                f"{where}: missing weight {k}; the checkpoint does not match its config.json"
            )
    for k in sorted(got):
        if k not in expected:
            raise CheckpointError(
                f"{where}: unexpected weight {k}; the checkpoint does not match its config.json"
            )
        if tuple(got[k].shape) != tuple(expected[k]):
            raise CheckpointError(
                f"{where}: weight {k} has shape {tuple(got[k].shape)}, config.json implies {tuple(expected[k])}"
            )


def load_model(path: str | Path, dtype: Any = None) -> Any:
    """Build the MLX Model from a checkpoint directory and load its weights (strict).

    Reads our directories and Hugging Face deepseek_v3 ones (one file or shards, any float
    dtype, per-expert/stacked/fused experts; see hf.py). dtype None keeps the file's dtypes.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from . import hf
    from .model import Model

    p = require_dir(path)
    args = load_args(p)
    weights: dict[str, Any] = {}
    for f in hf.weight_files(p):
        weights.update(read_safetensors(f))
    hf.check_weights_not_quantized(weights, str(p))
    try:  # any supported layout -> our names, experts stacked [E, out, in]
        concat = lambda xs, axis: mx.concatenate(xs, axis)  # noqa: E731
        weights, args = hf.normalise_weights(weights, args, mx.stack, concat)
        weights = stack_experts(weights, mx.stack)
    except CheckpointError as e:
        raise CheckpointError(f"{p}: {e}") from None
    if args.num_nextn_predict_layers and not any(k.startswith("mtp.") for k in weights):
        args = args.replace(
            num_nextn_predict_layers=0
        )  # MTP modules not shipped: not needed to decode
    model = Model(args)
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    check_shapes(expected, weights, str(p))
    if dtype is not None:  # the routing bias stays float32 (SPEC section 4)
        weights = {
            k: v if "e_score_correction_bias" in k else v.astype(dtype) for k, v in weights.items()
        }
    bias = "e_score_correction_bias"  # float32 whatever the file holds (transformers: a buffer)
    weights = {k: v.astype(mx.float32) if bias in k else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model
