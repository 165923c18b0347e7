"""Training cost of one MTP module on a preset: `python -m tools.mtp_cost [--preset small]`.

Two Trainers from the same seeded weights, one with num_nextn_predict_layers 0 and one with 1,
time optimizer steps on the same random batches, interleaved (one step each per round, after
two warm-up steps), and report the median tokens/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from mlx_model import speedups


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.mtp_cost", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help="model and batch preset")
    p.add_argument("--rounds", type=int, default=8, help="interleaved timed steps per trainer")
    a = p.parse_args(argv)
    speedups.enable_for_cli()  # a fast BLAS and vectorised kernels, before mlx.core loads
    import mlx.core as mx

    from mlx_model.model import Model
    from mlx_model.presets import preset
    from mlx_model.train_config import TrainConfig
    from mlx_model.trainer import Trainer

    cfg = TrainConfig(preset=a.preset, max_steps=1000, warmup=10, progress=False)
    B, T = cfg.batch_size, cfg.seq_len
    rng = np.random.default_rng(0)
    trainers = {}
    for depth in (0, 1):
        args = preset(a.preset).replace(num_nextn_predict_layers=depth)
        mx.random.seed(0)
        model = Model(args)
        model.train()
        trainers[depth] = Trainer(cfg, args, model)
    batch = [mx.array(rng.integers(0, preset(a.preset).vocab_size, (B, T + 1)))]
    times: dict[int, list[float]] = {0: [], 1: []}
    for r in range(a.rounds + 2):
        for depth in (0, 1) if r % 2 == 0 else (1, 0):
            t = time.perf_counter()
            trainers[depth].step(batch)
            if r >= 2:
                times[depth].append(time.perf_counter() - t)
    tps = {d: B * T / statistics.median(ts) for d, ts in times.items()}
    print(
        f"{a.preset}: tokens/s without MTP {tps[0]:.0f}, with 1 MTP module {tps[1]:.0f} "
        f"({tps[1] / tps[0]:.2f}x)"
    )


if __name__ == "__main__":
    main()
