"""Convert checkpoints between the MLX model and its PyTorch twin (`torch_reference`).

Both twins use the same weight names (SPEC section 2), so conversion moves tensors, bit for bit:
- an MLX checkpoint directory (config.json + model.safetensors with per-expert names);
- a torch state dict (`.pt`/`.pth`/`.bin` via torch.save, or `.safetensors`) with the twin's
  names: routed experts stacked [E, out, in], as `torch_reference.model.Model.state_dict()`.

    python -m tools.convert --to-torch CKPT_DIR --out model.pt [--dtype bfloat16]
    python -m tools.convert --from-torch model.pt --config CKPT_DIR_or_config.json --out NEW_DIR
    python -m tools.convert --from-hf HF_DIR --out NEW_DIR     (mlx_model/hf.py)
    python -m tools.convert --to-hf CKPT_DIR --out HF_DIR

Dtypes are kept unless --dtype asks for a cast, which leaves the routing bias as it is (float32).
Bad input ends with a one-line `error: ...` on stderr naming the offending key, exit status 2,
and nothing written: outputs go to a temporary name first and are moved into place at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import torch
from mlx.utils import tree_flatten

from mlx_model.checkpoint import CheckpointError, check_shapes, load_args, load_model, save_model
from mlx_model.config import ConfigError, ModelArgs

DTYPES = ("float32", "bfloat16", "float16")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
)
BIAS = "e_score_correction_bias"  # routing bias: float32 whatever the weights' dtype


class ConvertError(ValueError):
    """Input the converter cannot use; the message is one line naming the file or key."""


# ------------------------------------------------------------------ tensor conversion
def mx_to_torch(a: mx.array) -> torch.Tensor:
    """Exact copy (bfloat16 travels as its 16-bit pattern: numpy has no bfloat16)."""
    if a.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(a.view(mx.int16))).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def torch_to_mx(t: torch.Tensor) -> mx.array:
    """Exact copy of a CPU or device tensor."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(t.numpy())


def cast_mx(weights: dict[str, mx.array], dtype: str | None) -> dict[str, mx.array]:
    """Cast every weight but the routing bias to `dtype` (None: unchanged)."""
    if dtype is None:
        return weights
    d = getattr(mx, dtype)
    return {k: v if BIAS in k else v.astype(d) for k, v in weights.items()}


def cast_torch(state: dict[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    d = getattr(torch, dtype)
    return {k: v if BIAS in k else v.to(d) for k, v in state.items()}


# -------------------------------------------------------------------- library API
def mlx_to_torch_state(model: Any, dtype: str | None = None) -> dict[str, torch.Tensor]:
    """An MLX Model -> a torch_reference.model.Model state dict (same names, stacked experts)."""
    weights = cast_mx(dict(tree_flatten(model.parameters())), dtype)
    return {k: mx_to_torch(v) for k, v in weights.items()}


def expected_shapes(args: ModelArgs) -> dict[str, tuple]:
    """Weight name -> shape of the MLX Model for `args` (MLX is lazy: nothing is computed)."""
    from mlx_model.model import Model

    return {k: tuple(v.shape) for k, v in tree_flatten(Model(args).parameters())}


def torch_to_mlx_weights(
    state: dict[str, torch.Tensor],
    args: ModelArgs,
    dtype: str | None = None,
    where: str = "state dict",
) -> dict[str, mx.array]:
    """A torch twin state dict -> MLX weights (stacked names), checked against `args`:
    raises CheckpointError naming the first missing, unexpected or mis-shaped key."""
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ConvertError(f"{where}: entry {k} is a {type(v).__name__}, not a tensor")
    check_shapes(expected_shapes(args), state, where)
    state = cast_torch(state, dtype)
    for k, v in state.items():
        if v.dtype == torch.float64 and BIAS not in k:
            raise ConvertError(
                f"{where}: weight {k} is float64, which MLX checkpoints do not hold; "
                "pass --dtype float32"
            )
    # A float64 twin's routing bias becomes float32 (as MLX keeps it); other dtypes stay.
    return {k: torch_to_mx(v.float() if v.dtype == torch.float64 else v) for k, v in state.items()}


def load_mlx_from_torch(
    model: Any, state: dict[str, torch.Tensor], dtype: str | None = None
) -> None:
    """Copy a torch twin's weights into an existing MLX Model (used by the parity tests)."""
    weights = torch_to_mlx_weights(state, model.args, dtype)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())


def read_torch_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A `.safetensors` file or a torch.save'd state dict -> {name: tensor}."""
    p = Path(path)
    if not p.is_file():
        raise ConvertError(f"{p} is not a file: pass a .pt/.pth/.bin or .safetensors state dict")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, pickled objects...
        raise ConvertError(
            f"cannot read {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    if not isinstance(state, dict):
        raise ConvertError(f"{p} holds a {type(state).__name__}, not a state dict")
    return state


def read_config(path: str | Path) -> tuple[ModelArgs, Path | None]:
    """ModelArgs from a checkpoint directory or a config.json; also the directory to take
    tokenizer files from (None for a bare config file)."""
    p = Path(path)
    if p.is_dir():
        return load_args(p), p
    if not p.is_file():
        raise ConvertError(f"--config {p}: no such file or directory")
    try:
        args = ModelArgs.from_dict(json.loads(p.read_text())).validate()
    except (json.JSONDecodeError, ConfigError, TypeError) as e:
        raise ConvertError(f"{p}: {e}") from None
    return args, p.parent


def to_torch(
    ckpt_dir: str | Path, out: str | Path, dtype: str | None = None
) -> dict[str, torch.Tensor]:
    """MLX checkpoint directory -> torch state dict file (`.safetensors` or torch.save)."""
    out = Path(out)
    if out.suffix not in TORCH_SUFFIXES:
        raise ConvertError(f"--out {out}: name a {'/'.join(TORCH_SUFFIXES)} file")
    state = mlx_to_torch_state(load_model(ckpt_dir), dtype)  # load_model checks names and shapes

    def write(tmp: str) -> None:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, tmp, metadata={"format": "pt"})
        else:
            torch.save(state, tmp)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{out.name}", dir=out.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return state


def from_torch(
    path: str | Path, config: str | Path, out: str | Path, dtype: str | None = None
) -> Any:
    """torch state dict file + config -> MLX checkpoint directory (config, weights, tokenizer)."""
    from mlx_model.model import Model

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} exists and is not a directory")
    args, tok_dir = read_config(config)
    state = read_torch_state(path)
    if args.num_nextn_predict_layers and not any(k.startswith("mtp.") for k in state):
        args = args.replace(num_nextn_predict_layers=0)  # no MTP weights: as load_model does
    weights = torch_to_mlx_weights(state, args, dtype, where=str(path))
    model = Model(args)
    model.load_weights(list(weights.items()), strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}", dir=out.parent))
    try:
        save_model(tmp, model)
        for name in TOKENIZER_FILES if tok_dir is not None else ():
            if (tok_dir / name).is_file():
                shutil.copy2(tok_dir / name, tmp / name)
        if not out.exists():
            os.replace(tmp, out)
        else:  # an existing directory: replace our files in it, leave the rest
            if not (tmp / "mtp.safetensors").exists() and (out / "mtp.safetensors").exists():
                (out / "mtp.safetensors").unlink()  # stale: would not match the new config
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m tools.convert",
        description="Convert checkpoints between MLX and PyTorch (same weight names).",
    )
    # One source flag per conversion (as --from-hf and --to-hf): a new one is one more flag here
    # plus one branch in run().
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--to-torch", metavar="CKPT_DIR", help="MLX checkpoint directory -> torch state dict file"
    )
    src.add_argument(
        "--from-torch",
        metavar="FILE",
        help="torch state dict (.pt/.pth/.bin/.safetensors) -> MLX directory",
    )
    src.add_argument(
        "--from-hf",
        metavar="HF_DIR",
        help="Hugging Face deepseek_v3 directory (transformers, mlx-lm) -> MLX directory",
    )
    src.add_argument(
        "--to-hf",
        metavar="CKPT_DIR",
        help="MLX checkpoint -> transformers/mlx-lm directory (needs a deepseek_v3 form)",
    )
    ap.add_argument("--out", required=True, help="output file (--to-torch) or directory")
    ap.add_argument(
        "--config", help="--from-torch: checkpoint directory or config.json describing the model"
    )
    ap.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep their dtype)")
    return ap


def run(a: argparse.Namespace) -> str:
    """Do the conversion named by the parsed flags; returns a one-line summary."""
    if a.to_torch is not None:
        state = to_torch(a.to_torch, a.out, a.dtype)
        n = sum(v.numel() for v in state.values())
        dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values()})
        return f"wrote {a.out}: {len(state)} tensors, {n:,} numbers, {'/'.join(dtypes)}"
    if a.from_torch is not None:
        if a.config is None:
            raise ConvertError("--from-torch needs --config CKPT_DIR_or_config.json")
        model = from_torch(a.from_torch, a.config, a.out, a.dtype)
        flat = tree_flatten(model.parameters())
        n = sum(v.size for _, v in flat)
        return f"wrote {a.out}: {len(flat)} tensors, {n:,} numbers (config.json, model.safetensors)"
    if a.from_hf is not None or a.to_hf is not None:
        from mlx_model.hf import export_hf, import_hf

        convert = import_hf if a.from_hf is not None else export_hf
        model = convert(a.from_hf or a.to_hf, a.out, getattr(mx, a.dtype) if a.dtype else None)
        n = sum(v.size for _, v in tree_flatten(model.parameters()))
        return f"wrote {a.out}: {n:,} numbers (config.json, model.safetensors, tokenizer files)"
    raise ConvertError("choose a conversion: --to-torch, --from-torch, --from-hf or --to-hf")


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    try:
        print(run(a))
    except (ConvertError, CheckpointError, ConfigError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
