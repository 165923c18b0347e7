"""Train the model: `python -m mlx_model.train [--preset small] [--data PATH ...] [--out DIR]`.

In order, each optimizer step: lr from the schedule; `accum` compiled micro-steps that sum
gradients; one compiled update (average, all-reduce across ranks, clip, AdamW); the MoE
balance-bias update from the step's summed expert counts; log; evaluate every
`eval_every` steps on fixed validation batches; checkpoint every `save_every` steps.
Data parallel when launched by `mlx.launch` (mx.distributed): each rank reads its shard of
every global batch; only rank 0 writes files and the progress bar. A rank that dies, hangs or
cannot connect ends the run with an error line within `dist_timeout` seconds (see Watchdog).
Settings: `TrainConfig` and the training presets in `train_config.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a program: fast BLAS + kernels before mlx.core is imported
    from mlx_model.speedups import enable_for_cli

    enable_for_cli()

import mlx.core as mx
import numpy as np

from . import checkpoint as ckpt
from .budget import plan_for_cli
from .config import ConfigError, ModelArgs
from .data import DataError, Tokenizer, eval_batches, get_batch, prepare_data
from .distributed import DistributedError, Watchdog, all_sum_or_fail, init_group
from .hf import CONFIG_EXTRAS
from .model import Model
from .presets import preset
from .train_config import (  # noqa: F401  (TrainConfig, PRESET_TRAINING also imported from here)
    DEFAULT_OUT,
    PRESET_TRAINING,
    TrainConfig,
    TrainError,
    add_dataclass_flags,
    check_config,
    training_preset,
)
from .train_log import (
    MetricsLog,
    print_done,
    print_setup,
    progress_bar,
    show_progress,
    train_record,
)
from .train_state import read_optimizer_state, read_trainer_state
from .trainer import Trainer  # noqa: F401  (also imported from here)


# --------------------------------------------------------------------------- config
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_model.train",
        description=__doc__.split("\n")[0],
        argument_default=argparse.SUPPRESS,
    )
    add_dataclass_flags(p.add_argument_group("training"), TrainConfig)
    add_dataclass_flags(
        p.add_argument_group("model (override the preset; see ModelArgs in mlx_model/config.py)"),
        ModelArgs,
        skip=("model_type", "rope_scaling"),
        default_help="model setting: see the ModelArgs docstring",
    )
    return p


def resolve(argv: list[str] | None = None) -> tuple[TrainConfig, ModelArgs]:
    """Preset < --config file < individual flags. Resume takes the saved settings."""
    ns = vars(build_parser().parse_args(argv))
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    model_keys = {f.name for f in dataclasses.fields(ModelArgs)}
    name = ns.get("preset", "small")
    if ns.get("resume"):
        state = read_trainer_state(ns["resume"])
        base = {
            **state["train_config"],
            "stop_at": 0,
            **{k: v for k, v in ns.items() if k in train_keys},
        }
        return TrainConfig(**base), ckpt.load_args(ns["resume"])
    args = preset(name)
    train = {"preset": name, **training_preset(name)}
    if ns.get("config"):
        try:
            file_cfg = json.loads(Path(ns["config"]).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrainError(f"cannot read --config {ns['config']}: {e}") from None
        unknown = set(file_cfg) - train_keys - model_keys - set(CONFIG_EXTRAS)
        if unknown:
            raise TrainError(
                f"--config {ns['config']}: unknown keys {sorted(unknown)}; "
                "see --help for valid names"
            )
        args = args.replace(**{k: v for k, v in file_cfg.items() if k in model_keys})
        train.update({k: v for k, v in file_cfg.items() if k in train_keys})
    args = args.replace(**{k: v for k, v in ns.items() if k in model_keys})
    train.update({k: v for k, v in ns.items() if k in train_keys})
    return TrainConfig(**train), args.validate()


# ------------------------------------------------------------------------ set-up
def peak_memory() -> int:
    """Peak bytes: MLX's allocator peak (GPU), or the process's max RSS (CPU)."""
    import resource

    return max(mx.get_peak_memory(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def pick_dtype(name: str) -> mx.Dtype:
    if name == "auto":
        return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    return getattr(mx, name)


def prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainError(
            f"cannot write to --out {out}: {e.strerror}; choose a writable directory"
        ) from None


def _init_from_args(cfg: TrainConfig, args: ModelArgs) -> ModelArgs:
    """--init-from: the checkpoint's architecture with this run's training-only model keys."""
    if not cfg.init_from or cfg.resume:
        return args
    keep = (
        "bias_update_speed",
        "bias_update_rule",
        "balance_loss_alpha",
        "capacity_factor",
        "mtp_loss_weight",
    )
    return ckpt.load_args(cfg.init_from).replace(**{k: getattr(args, k) for k in keep})


def _load_data(
    cfg: TrainConfig, args: ModelArgs, group: Any, rank: int, world: int
) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """Tokenizer and train/validation token streams; rank 0 fills the tokenized-data cache
    first and the others then read it. Checks that they fit the model and one sequence."""
    tok_src = cfg.resume or cfg.tokenizer or cfg.init_from
    cache_dir = cfg.cache_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlx_deepseek"
    )
    if world > 1 and rank > 0:
        all_sum_or_fail(group, mx.array(0.0), "during start-up")
    tok, train_ids, val_ids = prepare_data(  # memory-mapped token store
        cfg.data,
        tok_src,
        args.vocab_size,
        cache_dir,
        cfg.val_fraction,
        cfg.text_field,
        progress=cfg.progress and rank == 0,
    )
    if world > 1:
        if rank == 0:
            all_sum_or_fail(group, mx.array(0.0), "during start-up")
        _check_same_data(group, rank, world, tok, train_ids, val_ids)
    if tok.vocab_size > args.vocab_size:
        raise TrainError(
            f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
            f"{args.vocab_size}: pass --vocab-size {tok.vocab_size} or a matching tokenizer"
        )
    for name, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) < cfg.seq_len + 1:
            raise TrainError(
                f"the {name} split has {len(ids)} tokens, fewer than one sequence of "
                f"{cfg.seq_len + 1}: add more text or lower --seq-len"
            )
    return tok, train_ids, val_ids


def _check_same_data(
    group: Any, rank: int, world: int, tok: Tokenizer, train_ids: np.ndarray, val_ids: np.ndarray
) -> None:
    """Every rank must cut its shards from the same token stream: all-reduce a small signature
    (lengths, vocabulary, a checksum of 4096 evenly spaced tokens: a few thousand pages of the
    memory-mapped store, whatever its size) and compare it with world x our own."""
    where = np.linspace(0, len(train_ids) - 1, num=min(4096, len(train_ids))).astype(np.int64)
    fields = (len(train_ids), len(val_ids), tok.vocab_size, train_ids[where].sum(dtype=np.uint64))
    sig = mx.array([int(v) % 65521 for v in fields], mx.float32)
    if not mx.array_equal(all_sum_or_fail(group, sig, "during start-up"), sig * world).item():
        raise TrainError(
            f"rank {rank} has different training data ({len(train_ids)} tokens) or tokenizer "
            "than another rank: give every host the same --data files, --tokenizer and "
            "--val-fraction"
        )


def build_model(cfg: TrainConfig, args: ModelArgs) -> Model:
    """A fresh model for `args`: random, or with the weights of --resume / --init-from,
    in the training dtype (the routing bias stays float32)."""
    mx.random.seed(cfg.seed)
    dtype = pick_dtype(cfg.dtype)
    src = cfg.resume or cfg.init_from
    if src:
        loaded = ckpt.load_model(src, dtype=dtype)
        args.num_nextn_predict_layers = loaded.args.num_nextn_predict_layers
        model = Model(args)  # our args (training settings may differ from the checkpoint's)
        model.update(loaded.parameters())
    else:
        model = Model(args)
        if dtype != mx.float32:
            ckpt.cast_model(model, dtype)
    model.train()
    mx.eval(model.parameters())
    return model


def _validation_batches(cfg: TrainConfig, val_ids: np.ndarray, rank: int, world: int) -> list:
    """Fixed validation batches of the global size; rank r evaluates rows [r*B, (r+1)*B) of each
    (maybe none of a short last batch) and evaluate() all_sums token-weighted CE: the same value
    as one rank."""
    val = eval_batches(val_ids, cfg.batch_size * world, cfg.seq_len, cfg.eval_batches)
    if world == 1:
        return val
    rows = [b[rank * cfg.batch_size : (rank + 1) * cfg.batch_size] for b in val]
    return [v for v in rows if len(v)]


def _stop_agreed(trainer: Trainer, interrupted: list) -> bool:
    """True once any rank saw Ctrl-C, on every rank at the same step (so all stop and rank 0
    saves)."""
    if trainer.world > 1 and trainer.all_sum(mx.array(float(len(interrupted)))).item() > 0:
        interrupted.append(1)
    return bool(interrupted)


def _is_ring_error(e: RuntimeError) -> bool:
    """MLX's ring backend reports a lost peer as a RuntimeError such as
    "[ring] connection to a peer was lost"."""
    return any(w in str(e).lower() for w in ("[ring]", "connection", "peer", "socket"))


# ------------------------------------------------------------------------ training
def train(cfg: TrainConfig, args: ModelArgs) -> dict[str, Any]:
    """Run training; returns the last metrics. Raises the *Error classes on bad input."""
    # --- set-up
    check_config(cfg, on_gpu=mx.default_device() == mx.gpu)
    group = init_group(cfg.dist_timeout)
    rank, world = group.rank(), group.size()
    group = group if world > 1 else None
    out = Path(cfg.out)
    if rank == 0:
        prepare_out(out)
    start = read_trainer_state(cfg.resume)["step"] if cfg.resume else 0
    args = _init_from_args(cfg, args)
    tok, train_ids, val_ids = _load_data(cfg, args, group, rank, world)
    if args.eos_token_id is None and tok.eos_id is not None:
        args.eos_token_id, args.bos_token_id = tok.eos_id, tok.bos_id
    model = build_model(cfg, args)
    opt_state = read_optimizer_state(cfg.resume) if cfg.resume else None
    trainer = Trainer(cfg, model.args, model, group, opt_state)
    val = _validation_batches(cfg, val_ids, rank, world)
    if rank == 0:
        print_setup(cfg, args, model, len(train_ids), len(val_ids), world)
    log = MetricsLog(out, cfg.resume, start, enabled=rank == 0)
    bar = progress_bar(cfg, rank, start)
    last_ckpt = f"{cfg.resume} (step {start})" if cfg.resume else "none yet"
    wd = Watchdog(rank, world, cfg.dist_timeout, out, last_ckpt)
    interrupted: list[int] = []
    old_handler = signal.signal(signal.SIGINT, lambda *a: interrupted.append(1))
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.accum * world
    end = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.max_steps
    last: dict[str, Any] = {}
    step = start
    # --- the loop
    t0 = time.perf_counter()
    try:
        while step < end and not _stop_agreed(trainer, interrupted):
            lr = float(trainer.schedule(mx.array(step)))
            batches = [
                mx.array(
                    get_batch(
                        train_ids, cfg.batch_size, cfg.seq_len, cfg.seed, step, m, rank, world
                    )
                )
                for m in range(cfg.accum)
            ]
            m = trainer.step(batches)
            step += 1
            dt, t0 = time.perf_counter() - t0, time.perf_counter()
            m.update(step=step, lr=lr, tokens_per_s=tokens_per_step / dt, steps_per_s=1 / dt)
            m.update(micro_batches_per_s=cfg.accum / dt, peak_memory_bytes=peak_memory())
            if not math.isfinite(m["loss"]):
                raise TrainError(
                    f"loss became {m['loss']} at step {step}: lower --lr or check the data"
                )
            last = m
            if step % cfg.log_every == 0 or step in (1, cfg.max_steps):
                log(train_record(m))
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                ev = trainer.evaluate(val)
                log({"step": step, **ev})
                last.update(ev)
                t0 = time.perf_counter()
            show_progress(bar, m, last, lr)
            saving = step % cfg.save_every == 0 or step in (cfg.max_steps, end)
            if rank == 0 and saving:
                with wd.lock:  # a failing rank exits only after the checkpoint is complete
                    trainer.save(out, tok, step)
                t0 = time.perf_counter()
            wd.kick(step, saved=saving)
        if interrupted:
            _save_on_interrupt(trainer, wd, group, rank, world, out, tok, step)
    except RuntimeError as e:
        if world == 1 or not _is_ring_error(e):
            raise
        wd.fail(
            f"lost the connection to another rank after step {step} ({e}): "
            "a rank died or cannot connect"
        )
    finally:
        # --- teardown
        wd.close()
        signal.signal(signal.SIGINT, old_handler)
        if bar is not None:
            bar.close()
        log.close()
    if interrupted:
        raise KeyboardInterrupt
    if rank == 0:
        print_done(last, step, out)
    return last


def _save_on_interrupt(
    trainer: Trainer,
    wd: Watchdog,
    group: Any,
    rank: int,
    world: int,
    out: Path,
    tok: Tokenizer,
    step: int,
) -> None:
    """After Ctrl-C: rank 0 saves; the other ranks wait for that checkpoint (mlx.launch stops
    all ranks when one exits with an error status, 130 here)."""
    if rank == 0:
        with wd.lock:
            trainer.save(out, tok, step)
        print(
            f"\ninterrupted: saved step {step} to {out}; continue with --resume {out}",
            file=sys.stderr,
        )
    if world > 1:
        wd.close()
        all_sum_or_fail(group, mx.array(0.0), "after Ctrl-C")


def main(argv: list[str] | None = None) -> None:
    try:
        cfg, args = resolve(argv)
        planned = plan_for_cli(cfg, args)
        if planned is not None:
            if planned.grad_checkpoint:  # before anything is evaluated
                from .speedups import depth_first_order

                depth_first_order()
            train(planned, args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (TrainError, DataError, ConfigError, ckpt.CheckpointError, DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
