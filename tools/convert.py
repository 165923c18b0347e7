"""Convert checkpoints between the MLX model and its PyTorch twin (`torch_reference`).

Both twins use the same weight names (SPEC section 2), so conversion moves tensors, bit for bit:
- an MLX checkpoint directory (config.json + model.safetensors with per-expert names);
- a torch state dict (`.pt`/`.pth`/`.bin` via torch.save, or `.safetensors`) with the twin's
  names: routed experts stacked [E, out, in], as `torch_reference.model.Model.state_dict()`.

    python -m tools.convert --to-torch CKPT_DIR --out model.pt [--dtype bfloat16]
    python -m tools.convert --from-torch model.pt --config CKPT_DIR_or_config.json --out NEW_DIR
    python -m tools.convert --from-hf HF_DIR --out NEW_DIR     (mlx_model/hf.py)
    python -m tools.convert --to-hf CKPT_DIR --out HF_DIR
    python -m tools.convert --to-hf CKPT_DIR --out Q_DIR --quantize 4 [--group-size 64]

Dtypes are kept unless --dtype asks for a cast, which leaves the routing bias as it is (float32).
Bad input ends with a one-line `error: ...` on stderr naming the offending key, exit status 2,
and nothing written. Every on-disk rule (temporary names, the routing bias dtype, the MTP side
file, tokenizer files, config.json) is `mlx_model.checkpoint`'s; name mapping is
`mlx_model.hf`'s; this module only moves tensors between MLX and torch, plus the CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import torch
from mlx.utils import tree_flatten

from mlx_model import checkpoint as ckpt
from mlx_model.checkpoint import CheckpointError
from mlx_model.config import ConfigError, ModelArgs
from mlx_model.quantize import QuantizeError, weight_bytes, write_quantized

DTYPES = ("float32", "bfloat16", "float16")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


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


# -------------------------------------------------------------------- library API
def mlx_to_torch_state(model: Any, dtype: str | None = None) -> dict[str, torch.Tensor]:
    """An MLX Model -> a torch_reference.model.Model state dict (same names, stacked experts)."""
    weights = dict(tree_flatten(model.parameters()))
    if dtype is not None:  # the routing bias stays as it is
        weights = ckpt.cast_weights(weights, lambda v: v.astype(getattr(mx, dtype)))
    return {k: mx_to_torch(v) for k, v in weights.items()}


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
    ckpt.check_shapes(ckpt.expected_shapes(args), state, where)
    if dtype is not None:  # the routing bias stays as it is
        state = ckpt.cast_weights(state, lambda v: v.to(getattr(torch, dtype)))
    for k, v in state.items():
        if v.dtype == torch.float64 and ckpt.ROUTING_BIAS not in k:
            raise ConvertError(
                f"{where}: weight {k} is float64, which MLX checkpoints do not hold; "
                "pass --dtype float32"
            )
    # The routing bias becomes float32 (a float64 twin's too); other weights keep their dtype.
    state = ckpt.cast_weights(state, lambda v: v, lambda v: v.float())
    return {k: torch_to_mx(v) for k, v in state.items()}


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


def to_torch(
    ckpt_dir: str | Path, out: str | Path, dtype: str | None = None
) -> dict[str, torch.Tensor]:
    """MLX checkpoint directory -> torch state dict file (`.safetensors` or torch.save)."""
    out = Path(out)
    if out.suffix not in TORCH_SUFFIXES:
        raise ConvertError(f"--out {out}: name a {'/'.join(TORCH_SUFFIXES)} file")
    state = mlx_to_torch_state(ckpt.load_model(ckpt_dir), dtype)  # checks names and shapes

    def write(tmp: str) -> None:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, tmp, metadata={"format": "pt"})
        else:
            torch.save(state, tmp)

    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write(out, write)
    return state


def from_torch(
    path: str | Path, config: str | Path, out: str | Path, dtype: str | None = None
) -> Any:
    """torch state dict file + config -> MLX checkpoint directory (config, weights, tokenizer)."""
    from mlx_model.model import Model

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} exists and is not a directory")
    config = Path(config)
    if not config.exists():
        raise ConvertError(f"--config {config}: no such file or directory")
    args = ckpt.load_args(config)  # a checkpoint directory or a config.json
    state = read_torch_state(path)
    args = ckpt.fit_mtp(args, state)
    weights = torch_to_mlx_weights(state, args, dtype, where=str(path))
    model = Model(args)
    model.load_weights(list(weights.items()), strict=True)

    def fill(tmp: Path) -> None:  # tokenizer files from the config's directory
        ckpt.save_model(tmp, model)
        ckpt.copy_side_files(config if config.is_dir() else config.parent, tmp)

    ckpt.write_dir(out, fill, stale=(ckpt.MTP, ckpt.INDEX))  # existing dir: other files stay
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
    ap.add_argument(
        "--quantize",
        type=int,
        help="--to-hf: write 4- or 8-bit weights (MLX affine, as mlx-lm's convert -q; "
        "mlx_lm.load and mlx_model.generate read the directory)",
    )
    ap.add_argument(
        "--group-size", type=int, default=64, help="--quantize: weights per scale (32, 64, 128)"
    )
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
    if a.quantize is not None:
        if a.to_hf is None:
            raise ConvertError("--quantize goes with --to-hf CKPT_DIR (a float checkpoint)")
        model = write_quantized(a.to_hf, a.out, a.quantize, a.group_size)
        return f"wrote {a.out}: {a.quantize}-bit weights, {weight_bytes(model):,} bytes"
    if a.from_hf is not None or a.to_hf is not None:
        convert = ckpt.import_hf if a.from_hf is not None else ckpt.export_hf
        model = convert(a.from_hf or a.to_hf, a.out, getattr(mx, a.dtype) if a.dtype else None)
        n = sum(v.size for _, v in tree_flatten(model.parameters()))
        return f"wrote {a.out}: {n:,} numbers (config.json, model.safetensors, tokenizer files)"
    raise ConvertError("choose a conversion: --to-torch, --from-torch, --from-hf or --to-hf")


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    try:
        print(run(a))
    except (ConvertError, CheckpointError, ConfigError, QuantizeError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
