"""Train the model: `python -m mlx_model.train [--preset small] [--data PATH ...] [--out DIR]`.

In order, each optimizer step: lr from the schedule; `accum` compiled micro-steps that sum
gradients; one compiled update (average, all-reduce across ranks, clip, AdamW); the MoE
balance-bias sign update from the step's summed expert counts; log; evaluate every
`eval_every` steps on fixed validation batches; checkpoint every `save_every` steps.
Data parallel when launched by `mlx.launch` (mx.distributed): each rank reads its shard of
every global batch; only rank 0 writes files and the progress bar. A rank that dies, hangs or
cannot connect ends the run with an error line within `dist_timeout` seconds (see Watchdog).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

import mlx_model  # noqa: F401  (loads a fast BLAS before MLX)

from . import checkpoint as ckpt
from .config import ConfigError, ModelArgs, preset
from .data import DataError, eval_batches, get_batch, prepare_data
from .distributed import DistributedError, Watchdog, all_sum_or_fail, init_group
from .loss import moe_layers
from .model import Model
from .trainer import Trainer  # noqa: F401  (also imported from here)

DEFAULT_OUT = "weights/deepseek-small"


@dataclass
class TrainConfig:
    """Training settings (model settings live in ModelArgs; both become CLI flags)."""

    preset: str = "small"  # tiny | small | seed: model and training defaults
    config: str | None = None  # JSON file with model and/or training keys (overrides preset)
    data: list | None = None  # text files, directories, .jsonl; default: pydoc_data (offline)
    text_field: str = "text"  # field read from .jsonl lines
    tokenizer: str | None = None  # tokenizer.json / sentencepiece .model; default: train a BPE
    out: str = DEFAULT_OUT  # output checkpoint directory
    init_from: str | None = None  # start from this checkpoint's weights (fine-tuning)
    resume: str | None = None  # continue this run exactly (weights, optimizer, step)
    cache_dir: str | None = None  # tokenized-data cache (default ~/.cache/mlx_deepseek)
    batch_size: int = 16  # sequences per micro-batch (per rank)
    seq_len: int = 128  # tokens per sequence
    accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 500  # optimizer steps (sets the lr schedule)
    stop_at: int = 0  # stop and save after this step, keeping the schedule (0 = run to max_steps)
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup: int = 30  # linear warmup steps
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1  # AdamW decay on matrices only
    grad_clip: float = 1.0  # global-norm clipping (0 = off)
    eval_every: int = 100  # steps between validation passes (and at the end)
    eval_batches: int = 8  # fixed validation batches per pass
    save_every: int = 200  # steps between checkpoints (and at the end)
    log_every: int = 10  # steps between metrics.jsonl training lines
    val_fraction: float = 0.05  # held-out share of the token stream
    seed: int = 0  # model init and data order
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16
    compile: bool = True  # mx.compile the step functions
    progress: bool = True  # show the progress bar
    dist_timeout: float = (
        300.0  # data parallel: seconds without progress from the other ranks before giving up
    )
    lanes: int = 0  # CPU: micro-steps run side by side on this many threads (0 = auto: 2 on a multi-core Linux CPU)


PRESET_TRAINING = {
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
}


class TrainError(ValueError):
    """Bad training input: one line naming the problem and the fix."""


# --------------------------------------------------------------------------- config
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_model.train",
        description=__doc__.split("\n")[0],
        argument_default=argparse.SUPPRESS,
    )
    g = p.add_argument_group("training")
    for f in dataclasses.fields(TrainConfig):
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if f.name == "data":
            g.add_argument("--data", nargs="+", help="text files, directories or .jsonl")
        elif kind == "bool":
            g.add_argument(_flag(f.name), type=_bool, metavar="true|false")
        else:
            g.add_argument(_flag(f.name), type=_parse_type(kind), metavar=f.name.upper())
    m = p.add_argument_group("model (override the preset; see mlx_model/config.py)")
    for f in dataclasses.fields(ModelArgs):
        if f.name in ("model_type", "rope_scaling"):
            continue
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        typ = _bool if kind == "bool" else _parse_type(kind)
        m.add_argument(_flag(f.name), type=typ, metavar=f.name.upper())
    return p


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _parse_type(kind: str):
    if "int" in kind and "Optional" in kind:
        return lambda s: None if s.lower() in ("none", "null") else int(s)
    if "float" in kind:
        return float
    if "int" in kind:
        return int
    return str


def resolve(argv: list[str] | None = None) -> tuple[TrainConfig, ModelArgs]:
    """Preset < --config file < individual flags. Resume takes the saved settings."""
    ns = vars(build_parser().parse_args(argv))
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    model_keys = {f.name for f in dataclasses.fields(ModelArgs)}
    name = ns.get("preset", "small")
    if ns.get("resume"):
        state = _read_trainer_state(ns["resume"])
        base = {
            **state["train_config"],
            "stop_at": 0,
            **{k: v for k, v in ns.items() if k in train_keys},
        }
        args = ckpt.load_args(ns["resume"])
        return TrainConfig(**base), args
    args = preset(name)
    train = {"preset": name, **PRESET_TRAINING.get(name, {})}
    if ns.get("config"):
        try:
            file_cfg = json.loads(Path(ns["config"]).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrainError(f"cannot read --config {ns['config']}: {e}") from None
        unknown = (
            set(file_cfg)
            - train_keys
            - model_keys
            - {
                "architectures",
                "rope_parameters",
                "head_dim",
                "torch_dtype",
                "hf_compatible",
                "hf_incompatible_because",
            }
        )
        if unknown:
            raise TrainError(
                f"--config {ns['config']}: unknown keys {sorted(unknown)}; see --help for valid names"
            )
        args = args.replace(**{k: v for k, v in file_cfg.items() if k in model_keys})
        train.update({k: v for k, v in file_cfg.items() if k in train_keys})
    args = args.replace(**{k: v for k, v in ns.items() if k in model_keys})
    train.update({k: v for k, v in ns.items() if k in train_keys})
    cfg = TrainConfig(**train)
    return cfg, args.validate()


def check_config(cfg: TrainConfig) -> None:
    def bad(key: str, why: str) -> None:
        raise TrainError(f"invalid {_flag(key)} {getattr(cfg, key)!r}: {why}")

    for key in (
        "batch_size",
        "seq_len",
        "accum",
        "max_steps",
        "eval_every",
        "save_every",
        "log_every",
        "eval_batches",
    ):
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
    if cfg.lanes < 0:
        bad("lanes", "must be >= 0 (0 = auto)")
    if cfg.lanes > 1:
        if mx.default_device() != mx.cpu:
            bad("lanes", "lanes are CPU threads: use --lanes 1 (or 0) on a GPU")
        if cfg.accum % cfg.lanes and cfg.batch_size % cfg.lanes:
            bad("lanes", f"must divide --accum ({cfg.accum}) or --batch-size ({cfg.batch_size})")


# ------------------------------------------------------------------------ training
def _read_trainer_state(path: str) -> dict:
    f = Path(path) / "trainer_state.json"
    if not f.is_file():
        raise ckpt.CheckpointError(
            f"{path} has no trainer_state.json: it is not a resumable training output"
        )
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ckpt.CheckpointError(f"{f} is damaged ({e}); resume from an earlier copy") from None


# -------------------------------------------------------------------- data parallel
def _stop_agreed(trainer: Trainer, interrupted: list) -> bool:
    """True once any rank saw Ctrl-C, on every rank at the same step (so all stop and rank 0 saves)."""
    if trainer.world > 1 and trainer.all_sum(mx.array(float(len(interrupted)))).item() > 0:
        interrupted.append(1)
    return bool(interrupted)


def load_optimizer_state(path: Path) -> dict:
    f = path / "optimizer.safetensors"
    if not f.is_file():
        raise ckpt.CheckpointError(f"{path} has no optimizer.safetensors: cannot resume exactly")
    return tree_unflatten(list(ckpt.read_safetensors(f).items()))


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
            model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
            for layer in moe_layers(model):
                layer.gate.e_score_correction_bias = layer.gate.e_score_correction_bias.astype(
                    mx.float32
                )
    model.train()
    mx.eval(model.parameters())
    return model


def train(cfg: TrainConfig, args: ModelArgs) -> dict[str, Any]:
    """Run training; returns the last metrics. Raises the *Error classes on bad input."""
    check_config(cfg)
    group = init_group(cfg.dist_timeout)
    rank, world = group.rank(), group.size()
    group = group if world > 1 else None
    out = Path(cfg.out)
    if rank == 0:
        prepare_out(out)
    start = 0
    if cfg.resume:
        start = _read_trainer_state(cfg.resume)["step"]
        tok_src: str | None = cfg.resume
    else:
        tok_src = cfg.tokenizer or cfg.init_from
    if cfg.init_from and not cfg.resume:
        init_args = ckpt.load_args(cfg.init_from)
        args = init_args.replace(
            **{
                k: getattr(args, k)
                for k in (
                    "bias_update_speed",
                    "balance_loss_alpha",
                    "capacity_factor",
                    "mtp_loss_weight",
                )
            }
        )
    cache_dir = cfg.cache_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlx_deepseek"
    )
    if (
        world > 1 and rank > 0
    ):  # rank 0 fills the tokenized-data cache first; the others then read it
        all_sum_or_fail(group, mx.array(0.0), "during start-up")
    tok, train_ids, val_ids = prepare_data(
        cfg.data, tok_src, args.vocab_size, cache_dir, cfg.val_fraction
    )
    if world > 1:  # every rank must cut its shards from the same token stream
        if rank == 0:
            all_sum_or_fail(group, mx.array(0.0), "during start-up")
        sig = mx.array(
            [
                int(v) % 65521
                for v in (
                    len(train_ids),
                    len(val_ids),
                    tok.vocab_size,
                    train_ids[::997].sum(dtype=np.uint64),
                )
            ],
            mx.float32,
        )
        if not mx.array_equal(all_sum_or_fail(group, sig, "during start-up"), sig * world).item():
            raise TrainError(
                f"rank {rank} has different training data ({len(train_ids)} tokens) or tokenizer than "
                "another rank: give every host the same --data files, --tokenizer and --val-fraction"
            )
    if tok.vocab_size > args.vocab_size:
        raise TrainError(
            f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
            f"{args.vocab_size}: pass --vocab-size {tok.vocab_size} or a matching tokenizer"
        )
    if args.eos_token_id is None and tok.eos_id is not None:
        args.eos_token_id = tok.eos_id
        args.bos_token_id = tok.bos_id
    for name, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) < cfg.seq_len + 1:
            raise TrainError(
                f"the {name} split has {len(ids)} tokens, fewer than one sequence of "
                f"{cfg.seq_len + 1}: add more text or lower --seq-len"
            )
    model = build_model(cfg, args)
    opt_state = load_optimizer_state(Path(cfg.resume)) if cfg.resume else None
    trainer = Trainer(cfg, model.args, model, group, opt_state)
    # Fixed validation batches of the global size; rank r evaluates rows [r*B, (r+1)*B) of each (maybe
    # none of a short last batch) and evaluate() all_sums token-weighted CE: the same value as one rank.
    val = eval_batches(val_ids, cfg.batch_size * world, cfg.seq_len, cfg.eval_batches)
    if world > 1:
        val = [
            v
            for v in (b[rank * cfg.batch_size : (rank + 1) * cfg.batch_size] for b in val)
            if len(v)
        ]
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    if rank == 0:
        print(
            f"model: {n_params / 1e6:.2f}M parameters, {args.attention_type.upper()}, "
            f"{args.n_routed_experts} routed experts (top-{args.num_experts_per_tok}); "
            f"data: {len(train_ids)} train / {len(val_ids)} val tokens; world size {world}",
            file=sys.stderr,
        )
        print(
            "config: " + json.dumps({"train": dataclasses.asdict(cfg), "model": args.to_dict()}),
            file=sys.stderr,
        )
    metrics_f = None
    if rank == 0:  # keep only lines up to the step we start from (a resumed run rewrites the rest)
        mpath = out / "metrics.jsonl"
        src = Path(cfg.resume) / "metrics.jsonl" if cfg.resume else mpath
        kept = (
            [ln for ln in src.read_text().splitlines() if json.loads(ln)["step"] <= start]
            if start and src.is_file()
            else []
        )
        metrics_f = open(mpath, "w")
        metrics_f.writelines(ln + "\n" for ln in kept)

    def log(rec: dict) -> None:
        if metrics_f is not None:
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()

    interrupted = []
    old_handler = signal.signal(signal.SIGINT, lambda *a: interrupted.append(1))
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.max_steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr
        )
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.accum * world
    last: dict[str, Any] = {}
    step = start
    wd = Watchdog(
        rank,
        world,
        cfg.dist_timeout,
        out,
        f"{cfg.resume} (step {start})" if cfg.resume else "none yet",
    )
    t0 = time.perf_counter()
    try:
        end = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.max_steps
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
            dt = time.perf_counter() - t0
            t0 = time.perf_counter()
            m.update(
                step=step,
                lr=lr,
                tokens_per_s=tokens_per_step / dt,
                steps_per_s=1 / dt,
                micro_batches_per_s=cfg.accum / dt,
                peak_memory_bytes=peak_memory(),
            )
            if not math.isfinite(m["loss"]):
                raise TrainError(
                    f"loss became {m['loss']} at step {step}: lower --lr or check the data"
                )
            last = m
            if step % cfg.log_every == 0 or step == cfg.max_steps or step == 1:
                log(
                    {
                        k: m[k]
                        for k in ("step", "loss", "ce", "ppl", "lr", "tokens_per_s", "grad_norm")
                        if k in m
                    }
                    | {
                        k: v
                        for k, v in m.items()
                        if k
                        in (
                            "balance",
                            "mtp",
                            "expert_load_max_over_mean",
                            "expert_load",
                            "dropped_fraction",
                            "peak_memory_bytes",
                            "steps_per_s",
                        )
                    }
                )
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                ev = trainer.evaluate(val)
                log({"step": step, **ev})
                last.update(ev)
                t0 = time.perf_counter()
            if bar is not None:
                post = {
                    "ce": f"{m['ce']:.3f}",
                    "ppl": f"{m['ppl']:.1f}",
                    "lr": f"{lr:.2e}",
                    "tok/s": f"{m['tokens_per_s']:.0f}",
                    "mem": f"{m['peak_memory_bytes'] / 2**20:.0f}M",
                }
                if "expert_load_max_over_mean" in m:
                    post["load"] = f"{m['expert_load_max_over_mean']:.2f}"
                if "val_ce" in last:
                    post["val"] = f"{last['val_ce']:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            saving = step % cfg.save_every == 0 or step in (cfg.max_steps, end)
            if rank == 0 and saving:
                with wd.lock:  # a failing rank exits only after the checkpoint is complete
                    trainer.save(out, tok, step)
                t0 = time.perf_counter()
            wd.kick(step, saved=saving)
        if interrupted and rank == 0:
            with wd.lock:
                trainer.save(out, tok, step)
            print(
                f"\ninterrupted: saved step {step} to {out}; continue with --resume {out}",
                file=sys.stderr,
            )
        if (
            interrupted and world > 1
        ):  # the others wait for that checkpoint: mlx.launch stops all ranks when
            wd.close()  # one exits with an error status (130 here)
            all_sum_or_fail(group, mx.array(0.0), "after Ctrl-C")
    except RuntimeError as e:  # MLX's ring backend: "[ring] connection to a peer was lost"
        if world == 1 or not any(
            w in str(e).lower() for w in ("[ring]", "connection", "peer", "socket")
        ):
            raise
        wd.fail(
            f"lost the connection to another rank after step {step} ({e}): a rank died or cannot connect"
        )
    finally:
        wd.close()
        signal.signal(signal.SIGINT, old_handler)
        if bar is not None:
            bar.close()
        if metrics_f is not None:
            metrics_f.close()
    if interrupted:
        raise KeyboardInterrupt
    if rank == 0:
        print(
            f"done: step {step}, ce {last.get('ce', float('nan')):.4f}, val_ce {last.get('val_ce', float('nan')):.4f}"
            f" (ppl {last.get('val_ppl', float('nan')):.2f}); checkpoint in {out}",
            file=sys.stderr,
        )
    return last


def main(argv: list[str] | None = None) -> None:
    try:
        cfg, args = resolve(argv)
        train(cfg, args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (TrainError, DataError, ConfigError, ckpt.CheckpointError, DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
