"""Fitting a memory budget: `--memory-budget` picks the settings whose plan (memory.py) fits,
`--plan` prints the plan.

`fit_budget` picks micro-batch size, accumulation, checkpointing and the chunked update that
fit a budget while keeping the tokens of one optimizer step; only when nothing fits that way it
shrinks the optimizer state.
"""

from __future__ import annotations

import dataclasses

from .config import ModelArgs
from .memory import (
    MemoryPlan,
    count_parameters,
    default_budget,
    fmt_bytes,
    parse_bytes,
    plan_memory,
)
from .train_config import TrainConfig, TrainError


def fit_budget(
    args: ModelArgs, cfg: TrainConfig, budget: int, lanes: int = 1, cpu: bool = True
) -> tuple[TrainConfig, MemoryPlan]:
    """The first settings, fastest first, whose plan fits `budget`, with the same tokens per
    optimizer step (batch_size * accum): the largest micro-batch with the compiled update, then
    with the chunked update, then with checkpointing too; on `lanes` lanes, then on one. These
    keep the run's numbers (up to float32 summation order). Only when none fits, the optimizer
    state shrinks, which changes the numbers a little: the factored second moment, then also a
    bfloat16 first moment. Raises TrainError naming the largest term when none fits."""
    rows = cfg.batch_size * cfg.accum
    sizes = [b for b in range(rows, 0, -1) if rows % b == 0]
    chunk = cfg.update_chunk_mb or 64.0
    options = [(cfg.update_chunk_mb, cfg.grad_checkpoint), (chunk, cfg.grad_checkpoint)]
    options += [(chunk, True)]
    states = [(cfg.second_moment, cfg.moments_dtype), ("factored", cfg.moments_dtype)]
    states += [("factored", "bfloat16")]
    for second, moments in dict.fromkeys(states):
        for lane_count in dict.fromkeys((lanes, 1)):
            for chunk_mb, ckpt in dict.fromkeys(options):
                for b in sizes:
                    c = dataclasses.replace(
                        cfg,
                        batch_size=b,
                        accum=rows // b,
                        grad_checkpoint=ckpt,
                        update_chunk_mb=chunk_mb,
                        lanes=lane_count,
                        second_moment=second,
                        moments_dtype=moments,
                    )
                    if lane_count > 1 and c.accum % lane_count and b % lane_count:
                        continue
                    p = plan_memory(args, c, lane_count, cpu)
                    if p.total <= budget:
                        return c, p
    smallest = dataclasses.replace(
        cfg,
        batch_size=1,
        accum=rows,
        grad_checkpoint=True,
        lanes=1,
        update_chunk_mb=chunk,
        second_moment="factored",
        moments_dtype="bfloat16",
    )
    p = plan_memory(args, smallest, 1, cpu)
    name, size = p.largest()
    if "moments" in name:
        hint = "a smaller model"
    elif "activations" in name:
        hint = "a shorter --seq-len, a smaller --vocab-size or --dtype bfloat16"
    else:
        hint = "a smaller model (--hidden-size, --num-hidden-layers, --n-routed-experts)"
    raise TrainError(
        f"nothing fits --memory-budget {fmt_bytes(budget)}: even batch 1 with "
        f"--grad-checkpoint, a factored second moment and bfloat16 moments needs "
        f"{fmt_bytes(p.total)}, the largest term being {name} "
        f"({fmt_bytes(size)}): use {hint}, or a larger budget"
    )


def tokens_per_step(cfg: TrainConfig) -> int:
    return cfg.batch_size * cfg.seq_len * cfg.accum


def describe_choice(cfg: TrainConfig, plan: MemoryPlan, budget: int) -> str:
    ck = "on" if cfg.grad_checkpoint else "off"
    chunk = (
        f"chunked update ({cfg.update_chunk_mb:g} MB)" if cfg.update_chunk_mb else "compiled update"
    )
    state = "full v" if cfg.second_moment == "full" else "factored v"
    m = "" if cfg.moments_dtype == "auto" else f", {cfg.moments_dtype} moments"
    return (
        f"memory budget {fmt_bytes(budget)}: chose batch {cfg.batch_size} x accum {cfg.accum} "
        f"({tokens_per_step(cfg)} tokens per step), grad checkpointing {ck}, {chunk}, "
        f"{state}{m}, lanes {cfg.lanes or 1}: planned peak {fmt_bytes(plan.total)}"
    )


def effective_lanes(cfg: TrainConfig) -> int:
    """The lanes a Trainer would use for these settings (0 = auto)."""
    from .trainer import auto_lanes

    return cfg.lanes or auto_lanes(cfg.batch_size, cfg.accum)


def plan_for_cli(cfg: TrainConfig, args: ModelArgs) -> TrainConfig | None:
    """--memory-budget: the settings that fit, announced in one line; --plan: print the plan
    and return None (the caller exits without training)."""
    import sys

    import mlx.core as mx

    cpu = mx.default_device() == mx.cpu
    if cfg.memory_budget:
        budget = default_budget() if cfg.memory_budget == "auto" else parse_bytes(cfg.memory_budget)
        cfg, plan = fit_budget(args, cfg, budget, effective_lanes(cfg), cpu)
        print(describe_choice(cfg, plan, budget), file=sys.stderr)
    if not cfg.plan:
        return cfg
    lanes = effective_lanes(cfg)
    plan = plan_memory(args, cfg, lanes, cpu)
    n, _ = count_parameters(args)
    print(
        f"memory plan: {n / 1e6:.1f}M parameters, batch {cfg.batch_size} x {cfg.seq_len} x "
        f"accum {cfg.accum}, lanes {lanes}, grad checkpointing "
        f"{'on' if cfg.grad_checkpoint else 'off'}, update chunk {cfg.update_chunk_mb:g} MB, "
        f"moments {cfg.moments_dtype}, second moment {cfg.second_moment}"
    )
    print(plan.table())
    return None
