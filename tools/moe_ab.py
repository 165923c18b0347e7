"""MoE against dense in ONE process, and the routing-free floor: `python -m tools.moe_ab`.

    python -m tools.moe_ab [--preset small] [--rounds 20] [--batch-size 16] [--seq-len 128]

`python -m tools.bench train --only mlx_model mlx_dense` times the MoE preset and its dense
baseline (every FFN dense, same active parameters) in two worker processes; on a shared virtual
machine the two processes see different loads from one round to the next, and the ratio moves
by several percent between runs. Here three trainers live side by side in this process and take
turns, one whole training step each (our real compiled Trainer step, its default CPU lanes,
the same random batch), the starting row rotating each round:

  dense   the dense baseline (first_k_dense_replace = all layers);
  moe     the preset as shipped;
  floor   the preset with its routed experts' bookkeeping made free: every MoE layer still
          computes its gate, its top-k weights, the bias counts, k expert products per token
          and its shared expert, but the slots are laid out in a fixed, perfectly balanced
          order (expert e takes rows e*S/E .. (e+1)*S/E - 1 of the S = tokens*k slots), so the
          sort, the block layout, the padding rows and the gathers in and out are gone. Not a
          model (a token's rows go to whichever expert the fixed order gives): a measurement of
          how fast the MoE could train if routing cost nothing.

Prints each row's median step (wall and CPU seconds), its speed relative to dense (dense time /
its time), and the spread of that ratio over the rounds (each round's step against dense's step
of the same round, lowest-highest). moe / floor is the share of the step routing costs; floor /
dense is what the expert arithmetic itself costs against one wide dense FFN.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from typing import Any

from mlx_model import speedups

ROWS = ("dense", "moe", "floor")


def fixed_gather(experts: Any, x: Any, weights: Any, indices: Any) -> Any:
    """Experts.gather with a fixed, balanced slot order instead of the routed one (the floor).

    x [N, D], weights/indices [N, k] -> [N, D]: slot (token, j) is row j*N + token, expert e
    takes the contiguous rows e*S/E .. (e+1)*S/E - 1, one gather_mm block per expert."""
    import mlx.core as mx

    N, k = indices.shape
    E = experts.gate_proj.weight.shape[0]
    S = N * k
    if S % E:
        raise ValueError(f"floor: tokens*k = {S} slots do not split evenly over {E} experts")
    xs = mx.concatenate([x] * k).reshape(E, S // E, -1)
    y = experts.mlp(xs, mx.arange(E, dtype=mx.uint32), sorted_indices=True).reshape(k, N, -1)
    return (y * weights.T[..., None].astype(y.dtype)).sum(0)


def make_trainer(name: str, args: Any, batch_size: int, seq_len: int) -> Any:
    """One row's Trainer for the MoE model `args`, from seeded random weights."""
    import mlx.core as mx

    from mlx_model.model import Model
    from mlx_model.presets import dense_baseline
    from mlx_model.train_config import TrainConfig
    from mlx_model.trainer import Trainer

    if name == "dense":
        args = dense_baseline(args)
    mx.random.seed(0)
    model = Model(args)
    if name == "floor":
        for layer in model.layers:
            if hasattr(layer.mlp, "experts"):
                ex = layer.mlp.experts
                ex.gather = lambda x, w, i, ex=ex: fixed_gather(ex, x, w, i)
    model.train()
    mx.eval(model.parameters())
    cfg = TrainConfig(
        batch_size=batch_size, seq_len=seq_len, accum=1, max_steps=1000, warmup=10, progress=False
    )
    return Trainer(cfg, args, model)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(
    args: Any, rounds: int, batch_size: int, seq_len: int, warmup: int = 2
) -> dict[str, dict[str, list[float]]]:
    """row -> {"wall": [...], "cpu": [...]} per round (interleaved, rotating order)."""
    import mlx.core as mx
    import numpy as np

    trainers = {r: make_trainer(r, args, batch_size, seq_len) for r in ROWS}
    ids = np.random.default_rng(0).integers(0, args.vocab_size, (batch_size, seq_len + 1))
    batch = [mx.array(ids.astype(np.int32))]
    for t in trainers.values():  # compile
        for _ in range(warmup):
            t.step(batch)
    out: dict[str, dict[str, list[float]]] = {r: {"wall": [], "cpu": []} for r in ROWS}
    for i in range(rounds):
        for r in ROWS[i % len(ROWS) :] + ROWS[: i % len(ROWS)]:
            time.sleep(0.02)  # let the previous row's threads settle
            w, c = time.perf_counter(), cpu_seconds()
            trainers[r].step(batch)
            out[r]["wall"].append(time.perf_counter() - w)
            out[r]["cpu"].append(cpu_seconds() - c)
    return out


def report(res: dict[str, dict[str, list[float]]]) -> list[str]:
    """The table: per row, median wall/CPU per step, speed vs dense and its per-round spread."""
    ref = res["dense"]
    lines = []
    for r in ROWS:
        w, c = statistics.median(res[r]["wall"]), statistics.median(res[r]["cpu"])
        rounds = [d / x for d, x in zip(ref["wall"], res[r]["wall"])]
        lines.append(
            f"{r:6s} step {w * 1e3:7.1f} ms wall {c * 1e3:7.1f} ms CPU | speed vs dense: "
            f"{statistics.median(ref['wall']) / w:.3f}x wall (rounds {min(rounds):.2f}-"
            f"{max(rounds):.2f}x), {statistics.median(ref['cpu']) / c:.3f}x CPU"
        )
    m, f = (statistics.median(res[r]["wall"]) for r in ("moe", "floor"))
    lines.append(f"routing's share of the MoE step (1 - floor/moe, wall): {1 - f / m:.1%}")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.moe_ab", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help="a MoE model preset (default small)")
    p.add_argument("--rounds", type=int, default=20, help="timed steps per row (interleaved)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per step (tools.bench's 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (tools.bench's 128)")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.batch_size < 1 or a.seq_len < 2:
        p.error("--rounds and --batch-size must be >= 1, --seq-len >= 2")
    from mlx_model.config import ConfigError
    from mlx_model.presets import preset

    try:
        args = preset(a.preset)
    except ConfigError as e:
        p.error(str(e))
    if args.n_routed_experts == 0 or args.first_k_dense_replace >= args.num_hidden_layers:
        p.error(f"preset {a.preset} has no MoE layer: choose a MoE preset (small, tiny, seed)")
    if a.batch_size * a.seq_len * args.num_experts_per_tok % args.n_routed_experts:
        p.error("the floor row needs batch-size * seq-len * top-k divisible by the expert count")
    speedups.enable_for_cli()
    import mlx.core as mx

    res = measure(args, a.rounds, a.batch_size, a.seq_len)
    print(
        f"preset {a.preset}, batch {a.batch_size} x seq {a.seq_len}, {a.rounds} interleaved "
        f"steps per row, one process, {mx.default_device()} | {speedups.status().blas or 'no BLAS'}"
    )
    for line in report(res):
        print(line)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
