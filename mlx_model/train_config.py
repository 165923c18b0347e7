"""Training settings: `TrainConfig` (one typed field per CLI flag, with its help text) and the
training presets that go with the model presets of `presets.py`.

Stdlib only (no MLX import), like `config.py`, so tools can read presets cheaply. The CLI in
`train.py` builds one flag per field from `dataclasses.fields(TrainConfig)`: the field's type
(resolved with `typing.get_type_hints`, not guessed from strings) gives the parser, its
`metadata["help"]` the `--help` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import help_field as _f

DEFAULT_OUT = "weights/deepseek-small"


class TrainError(ValueError):
    """Bad training input: one line naming the problem and the fix."""


@dataclass
class TrainConfig:
    """Training settings (model settings live in ModelArgs; both become CLI flags)."""

    preset: str = _f("small", "model and training defaults: a name from mlx_model.presets.PRESETS")
    config: str | None = _f(None, "JSON file with model and/or training keys (overrides preset)")
    data: list[str] | None = _f(
        None,
        "text files, directories, .jsonl(.gz/.zst), .parquet, save_to_disk directories or "
        "hf:NAME[:CONFIG][:SPLIT]; default: pydoc_data (offline)",
    )
    text_field: str = _f("text", "field read from .jsonl lines, parquet files and datasets")
    tokenizer: str | None = _f(
        None, "tokenizer.json or sentencepiece .model; default: train a BPE on the data"
    )
    out: str = _f(DEFAULT_OUT, "output checkpoint directory")
    init_from: str | None = _f(None, "start from this checkpoint's weights (fine-tuning)")
    resume: str | None = _f(None, "continue this run exactly (weights, optimizer, step)")
    cache_dir: str | None = _f(None, "tokenized-data cache (default ~/.cache/mlx_deepseek)")
    batch_size: int = _f(16, "sequences per micro-batch (per rank)")
    seq_len: int = _f(128, "tokens per sequence")
    accum: int = _f(1, "micro-batches per optimizer step")
    max_steps: int = _f(500, "optimizer steps (sets the lr schedule)")
    stop_at: int = _f(
        0, "stop and save after this step, keeping the schedule (0 = run to max_steps)"
    )
    lr: float = _f(3e-3, "peak learning rate")
    min_lr_ratio: float = _f(0.1, "final lr = lr * min_lr_ratio")
    warmup: int = _f(30, "linear warmup steps")
    schedule: str = _f("cosine", "cosine | wsd | constant")
    decay_fraction: float = _f(0.2, "wsd: share of steps spent decaying")
    weight_decay: float = _f(0.1, "AdamW decay on matrices only")
    grad_clip: float = _f(1.0, "global-norm clipping (0 = off)")
    eval_every: int = _f(100, "steps between validation passes (and at the end)")
    eval_batches: int = _f(8, "fixed validation batches per pass")
    save_every: int = _f(200, "steps between checkpoints (and at the end)")
    keep: int = _f(1, "checkpoints kept in --out/checkpoints/ (the newest; older ones removed)")
    log_every: int = _f(10, "steps between metrics.jsonl training lines")
    val_fraction: float = _f(0.05, "held-out share of the token stream")
    seed: int = _f(0, "model init and data order")
    dtype: str = _f("auto", "auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16")
    compile: bool = _f(True, "mx.compile the step functions")
    progress: bool = _f(True, "show the progress bar")
    dist_timeout: float = _f(
        300.0, "data parallel: seconds without progress from the other ranks before giving up"
    )
    lanes: int = _f(
        0,
        "CPU: micro-steps run side by side on this many threads (0 = auto: 2 on a multi-core "
        "Linux CPU)",
    )
    grad_checkpoint: bool = _f(
        False, "recompute each decoder block's activations in the backward pass (less memory)"
    )
    moments_dtype: str = _f(
        "auto", "AdamW moment storage: auto (the parameters' dtype) | float32 | bfloat16"
    )
    second_moment: str = _f(
        "full",
        "AdamW second moment: full (a v per weight) | factored (row and column statistics for "
        "matrices and stacked experts, Adafactor-style: ~2 B/parameter less with bf16 m)",
    )
    update_chunk_mb: float = _f(
        0.0,
        "update parameters in chunks of about this many MB, each evaluated before the next (no "
        "second copy of all parameters and moments); 0 = one compiled update",
    )
    memory_budget: str = _f(
        "",
        "fit this budget (e.g. 5GB, 800MB; auto = Metal's recommended working set, else free "
        "RAM): picks micro-batch, accum and --grad-checkpoint keeping tokens per step",
    )
    plan: bool = _f(False, "print the memory plan for these settings and exit (no training)")


# Training defaults per model preset (batch shape, schedule); a preset not named here takes
# TrainConfig's defaults.
PRESET_TRAINING: dict[str, dict[str, Any]] = {
    "tiny": dict(
        batch_size=8,
        seq_len=64,
        accum=1,
        max_steps=60,
        lr=3e-3,
        warmup=10,
        eval_every=20,
        save_every=60,
        log_every=5,
        eval_batches=4,
    ),
    "small": dict(),
    "seed": dict(batch_size=2, seq_len=128, accum=8, max_steps=300, lr=1e-3, warmup=20),
    # 8192 tokens per step in micro-batches of one 256-token sequence; a bfloat16 first
    # moment, the factored second moment and the chunked update keep the peak under 5 GB
    # (see mlx_model/memory.py)
    "mac8gb": dict(
        batch_size=1,
        seq_len=256,
        accum=32,
        max_steps=2000,
        lr=1e-3,
        warmup=50,
        eval_batches=4,
        lanes=1,
        moments_dtype="bfloat16",
        second_moment="factored",
        update_chunk_mb=64.0,
    ),
}


def training_preset(name: str) -> dict[str, Any]:
    """The training settings a model preset comes with (a copy; {} for none)."""
    return dict(PRESET_TRAINING.get(name, {}))


# --------------------------------------------------------------------------- CLI
def flag(name: str) -> str:
    """The CLI flag of a field: `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


def parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def p(s: str) -> Any:
        return None if s.lower() in ("none", "null") else parse(s)

    return p


def add_dataclass_flags(
    group: argparse._ArgumentGroup, cls: type, skip: tuple[str, ...] = (), default_help: str = ""
) -> None:
    """One flag per field of dataclass `cls`, parsed by the field's real type
    (bool, int, float, str, X | None, list[str] | None); help from `metadata["help"]`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        typ, optional = hints[f.name], False
        args = typing.get_args(typ)
        if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
            rest = [a for a in args if a is not type(None)]
            optional, typ = len(rest) < len(args), rest[0]
        help_text = f.metadata.get("help", default_help)
        if help_text and f.default is not dataclasses.MISSING and f.default is not None:
            help_text += f" (default {f.default})"
        if typing.get_origin(typ) is list:
            group.add_argument(flag(f.name), nargs="+", metavar=f.name.upper(), help=help_text)
            continue
        if typ is bool:
            parse, metavar = parse_bool, "true|false"
        elif typ in (int, float, str):
            parse, metavar = typ, f.name.upper()
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no CLI parser for {typ}")
        group.add_argument(
            flag(f.name),
            type=_optional(parse) if optional and typ is not str else parse,
            metavar=metavar,
            help=help_text,
        )


def check_config(cfg: TrainConfig, on_gpu: bool = False) -> None:
    """Raise TrainError (one line: flag, value, fix) for a setting no run can use."""

    def bad(key: str, why: str) -> None:
        raise TrainError(f"invalid {flag(key)} {getattr(cfg, key)!r}: {why}")

    positive = ("batch_size", "seq_len", "accum", "max_steps", "eval_every", "save_every")
    for key in (*positive, "log_every", "eval_batches", "keep"):
        if getattr(cfg, key) <= 0:
            bad(key, "must be a positive integer")
    if cfg.lr <= 0:
        bad("lr", "must be > 0")
    if cfg.schedule not in ("cosine", "wsd", "constant"):
        bad("schedule", "choose cosine, wsd or constant")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        bad("dtype", "choose auto, float32 or bfloat16")
    if not 0 < cfg.val_fraction < 0.5:
        bad("val_fraction", "must be in (0, 0.5)")
    if cfg.warmup < 0:
        bad("warmup", "must be >= 0")
    if cfg.dist_timeout <= 0:
        bad("dist_timeout", "must be > 0 seconds")
    if cfg.moments_dtype not in ("auto", "float32", "bfloat16"):
        bad("moments_dtype", "choose auto, float32 or bfloat16")
    if cfg.second_moment not in ("full", "factored"):
        bad("second_moment", "choose full or factored")
    if cfg.update_chunk_mb < 0:
        bad("update_chunk_mb", "must be >= 0 (0 = one compiled update)")
    if cfg.lanes < 0:
        bad("lanes", "must be >= 0 (0 = auto)")
    if cfg.lanes > 1:
        if on_gpu:
            bad("lanes", "lanes are CPU threads: use --lanes 1 (or 0) on a GPU")
        if cfg.accum % cfg.lanes and cfg.batch_size % cfg.lanes:
            bad("lanes", f"must divide --accum ({cfg.accum}) or --batch-size ({cfg.batch_size})")
