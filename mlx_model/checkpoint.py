"""Checkpoint directories: every rule about what lies on disk, in one module.

Shared by training, generation, evaluation and the tools. A checkpoint is a Hugging Face-style
directory (a valid HF `deepseek_v3` one whenever the config has that form; otherwise config.json
says model_type mlx_deepseek and why, see hf.py):
    config.json          hf.config_from_args(args) (deepseek_v3 keys + our extras)
    model.safetensors    weights under SPEC section 2 names, routed experts per expert
    mtp.safetensors      multi-token-prediction modules (kept out of model.safetensors so that
                         mlx-lm's strict loader and transformers accept the directory); absent
                         when the model has none, and then num_nextn_predict_layers reads as 0
    tokenizer.json (+ tokenizer_config.json) or tokenizer.model
    optimizer.safetensors, trainer_state.json   (training outputs only, see train_state.py)
The routing bias (`e_score_correction_bias`) is float32 whatever the other weights' dtype
(SPEC section 4): `cast_weights` is the one place that says so.
Files are written to a temporary name and moved into place (`atomic_write`); directories are
built in a temporary sibling and published at the end (`write_dir`), so a failure leaves the
previous contents. `load_model` also reads directories written by transformers and mlx-lm
(sharded, bfloat16, stacked or fused experts, MTP layers); the layout mapping lives in hf.py,
which never imports this module.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import hf
from .config import HF_MODEL_TYPE, OWN_MODEL_TYPE, ConfigError, ModelArgs

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
MTP = "mtp.safetensors"
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
ROUTING_BIAS = "e_score_correction_bias"


class CheckpointError(ValueError):
    """A missing, truncated or mismatched checkpoint; the message names the problem and fix."""


# ---------------------------------------------------------------------------- rules
def cast_weights(
    weights: dict[str, Any], cast: Callable[[Any], Any], bias: Callable[[Any], Any] = lambda v: v
) -> dict[str, Any]:
    """`cast` every weight but the routing bias, which gets `bias` (default: kept as it is;
    it is float32 in every checkpoint we write, SPEC section 4)."""
    return {k: bias(v) if ROUTING_BIAS in k else cast(v) for k, v in weights.items()}


def fit_mtp(args: ModelArgs, names: Any) -> ModelArgs:
    """args with num_nextn_predict_layers 0 when the weight `names` hold no MTP module (a
    checkpoint without mtp.safetensors: decoding does not need it)."""
    if args.num_nextn_predict_layers and not any(k.startswith("mtp.") for k in names):
        return args.replace(num_nextn_predict_layers=0)
    return args


def split_mtp(weights: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(weights for model.safetensors, mtp.* weights for mtp.safetensors)."""
    main = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
    return main, {k: v for k, v in weights.items() if k.startswith("mtp.")}


# ------------------------------------------------------------------------- file I/O
def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), fsync, then os.replace onto path (the old file stays on failure)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj: Any) -> None:
    """A JSON file, written atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def temp_dir(parent: Path, prefix: str) -> Path:
    """A new empty directory in `parent`, with the permissions mkdir would give (not 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def write_dir(
    out: Path, fill: Callable[[Path], None], merge: bool = True, stale: tuple[str, ...] = ()
) -> bool:
    """Build a directory with fill(tmp) in a temporary sibling of `out`, then publish it.

    A new `out` is one rename of the whole directory. An existing `out` is kept when `merge`
    is False (someone else published it first: returns False); else each new file replaces its
    namesake and the `stale` names the new set lacks are removed; other files stay. On any
    error the temporary directory is removed and `out` is as before; a writer killed before it
    could do so leaves .tmp-NAME.HOST.PID.*, which the next write_dir on that host removes once
    PID is gone. Returns True if published.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = _tmp_prefix(out)
    _reap_dead_writers(out.parent, prefix)
    tmp = temp_dir(out.parent, f"{prefix}{os.getpid()}.")
    try:
        fill(tmp)
        if not out.exists():
            try:
                os.replace(tmp, out)
                return True
            except OSError:
                if not out.is_dir():  # not a lost race with another writer: a real failure
                    raise
        if not merge:
            return False
        for name in stale:
            if not (tmp / name).exists() and (out / name).exists():
                (out / name).unlink()
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tmp_prefix(out: Path) -> str:
    """Temporary siblings of `out` are named .tmp-NAME.HOST.PID.RANDOM (see write_dir)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
    return f".tmp-{out.name}.{host}."


def _reap_dead_writers(parent: Path, prefix: str) -> None:
    """Remove temporary siblings left by a killed writer on this host (its PID is gone).

    Another live process's directory (same host, PID alive) and other hosts' directories (a
    shared file system) are left alone: only a writer known to be dead is cleaned up after.
    """
    for old in parent.glob(f"{glob.escape(prefix)}*"):
        pid = old.name[len(prefix) :].split(".", 1)[0]
        if not pid.isdigit() or not old.is_dir() or old.is_symlink() or _alive(int(pid)):
            continue
        shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer and generation files of `src` (those it has) into `dst`."""
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def read_safetensors(path: Path) -> dict[str, Any]:
    """Load a safetensors file as MLX arrays (which hold bfloat16, unlike numpy)."""
    try:
        import mlx.core as mx

        return {k: v for k, v in mx.load(str(path)).items()}  # type: ignore[misc]
    except Exception as e:  # truncated or not a safetensors file
        raise CheckpointError(
            f"cannot read {path}: {e}; the file is damaged, re-save or re-download it"
        ) from None


# ---------------------------------------------------------------------- directories
def require_dir(path: str | Path) -> Path:
    """`path` as a Path if it is a directory with a config.json, else CheckpointError."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(
            f"{p} is not a directory: pass a checkpoint directory written by mlx_model.train"
        )
    if not (p / CONFIG).is_file():
        raise CheckpointError(f"{p} has no config.json: it is not a checkpoint directory")
    return p


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
    elif (path / WEIGHTS).is_file():
        files = [path / WEIGHTS]
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
    if (path / MTP).is_file():
        files.append(path / MTP)
    return files


def load_args(path: str | Path) -> ModelArgs:
    """Validated ModelArgs of a checkpoint directory (ours, or a Hugging Face deepseek_v3 one),
    or of a config.json file."""
    p = Path(path)
    f = p if p.is_file() else require_dir(p) / CONFIG
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{f} does not hold a JSON object")
    if d.get("model_type") not in (HF_MODEL_TYPE, OWN_MODEL_TYPE):
        raise CheckpointError(
            f"{p}: model_type {d.get('model_type')!r} is not supported; only {HF_MODEL_TYPE} "
            f"checkpoints (and our {OWN_MODEL_TYPE}) load here"
        )
    try:
        hf.check_not_quantized(d)
        return hf.args_from_config(d).validate()
    except hf.LayoutError as e:
        raise CheckpointError(f"{p}: {e}") from None
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{f}: {e}") from None


def write_config(out: Path, args: ModelArgs, dtype: str = "float32") -> None:
    """config.json of `out` for `args` (torch_dtype names the weights' dtype)."""
    write_json(Path(out) / CONFIG, {**hf.config_from_args(args), "torch_dtype": dtype})


# ------------------------------------------------------------------------ MLX models
def save_model(out_dir: str | Path, model: Any, tokenizer: Any = None) -> None:
    """Write config.json, model.safetensors (HF names), mtp.safetensors and the tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    main, mtp = split_mtp(hf.unstack_experts(dict(tree_flatten(model.parameters()))))
    meta = {"format": "pt"}
    atomic_write(out / WEIGHTS, lambda t: mx.save_safetensors(t, main, metadata=meta))
    if mtp:
        atomic_write(out / MTP, lambda t: mx.save_safetensors(t, mtp, metadata=meta))
    elif (out / MTP).exists():
        (out / MTP).unlink()
    if tokenizer is not None:
        tokenizer.save(str(out))
    if (out / INDEX).exists():  # a stale shard index would win
        (out / INDEX).unlink()
    write_config(out, model.args, str(model.lm_head.weight.dtype).replace("mlx.core.", ""))


def expected_shapes(args: ModelArgs) -> dict[str, tuple]:
    """Weight name -> shape of the MLX Model for `args` (MLX is lazy: nothing is computed)."""
    from mlx.utils import tree_flatten

    from .model import Model

    return {k: tuple(v.shape) for k, v in tree_flatten(Model(args).parameters())}


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
                f"{where}: weight {k} has shape {tuple(got[k].shape)}, "
                f"config.json implies {tuple(expected[k])}"
            )


def cast_model(model: Any, dtype: Any) -> Any:
    """The model's parameters in `dtype` (an mx.Dtype), routing bias float32; returns model."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    flat = dict(tree_flatten(model.parameters()))
    cast = cast_weights(flat, lambda v: v.astype(dtype), lambda v: v.astype(mx.float32))
    model.update(tree_unflatten(list(cast.items())))
    return model


def load_model(path: str | Path, dtype: Any = None) -> Any:
    """Build the MLX Model from a checkpoint directory and load its weights (strict).

    Reads our directories and Hugging Face deepseek_v3 ones (one file or shards, any float
    dtype, per-expert/stacked/fused experts; see hf.py). dtype None keeps the file's dtypes;
    the routing bias is float32 either way.
    """
    import mlx.core as mx

    from .model import Model

    p = require_dir(path)
    args = load_args(p)
    weights: dict[str, Any] = {}
    for f in weight_files(p):
        weights.update(read_safetensors(f))
    try:  # any supported layout -> our names, experts stacked [E, out, in]
        hf.check_weights_not_quantized(weights)
        concat = lambda xs, axis: mx.concatenate(xs, axis)  # noqa: E731
        weights = hf.normalise_weights(weights, args, mx.stack, concat)
    except hf.LayoutError as e:
        raise CheckpointError(f"{p}: {e}") from None
    args = fit_mtp(args, weights)
    check_shapes(expected_shapes(args), weights, str(p))
    keep = (lambda v: v.astype(dtype)) if dtype is not None else (lambda v: v)
    weights = cast_weights(weights, keep, lambda v: v.astype(mx.float32))
    model = Model(args)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


# ---------------------------------------------------------------- whole directories
def _resave(src: Path, out: Path, dtype: Any) -> Any:
    """Load `src` (any supported layout), write it as our directory at `out` with its tokenizer."""
    model = load_model(src, dtype=dtype)

    def fill(tmp: Path) -> None:
        save_model(tmp, model)
        copy_side_files(src, tmp)

    write_dir(out, fill, stale=(MTP, INDEX))  # those would not match the new weights
    return model


def import_hf(src: str | Path, out: str | Path, dtype: Any = None) -> Any:
    """A Hugging Face deepseek_v3 directory (any layout hf.py reads) -> our checkpoint directory.

    Returns the loaded MLX model. The tokenizer and generation files are copied.
    """
    return _resave(require_dir(src), Path(out), dtype)


def export_hf(src: str | Path, out: str | Path, dtype: Any = None) -> Any:
    """Our checkpoint -> a directory that transformers and mlx-lm load (model, config,
    tokenizer; no optimizer or trainer state). Raises CheckpointError when the config has
    no deepseek_v3 form, naming why."""
    src_p = require_dir(src)
    reason = hf.hf_incompatibility(load_args(src_p))
    if reason is not None:
        raise CheckpointError(f"{src_p} cannot be exported as Hugging Face deepseek_v3: {reason}")
    return _resave(src_p, Path(out), dtype)
