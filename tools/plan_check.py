"""The memory plan against MLX's measured peak, one preset at a time, at its own training
settings (or overridden ones):

    python -m tools.plan_check tiny small small-dense seed
    python -m tools.plan_check small --set batch_size=32 lanes=1

Each preset runs in a fresh process: two compiled training steps on random tokens, the peak of
the second (`mx.get_peak_memory()`, less what was allocated before the model was built) against
`memory.plan_memory`'s total. tests/test_memory.py holds the same comparison within 20% for its
cases; this prints it for whatever a user trains.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def measure(name: str, overrides: dict, seed: int = 11) -> dict:
    """Plan and measured peak (bytes) of one preset, in this process: two compiled training
    steps on seeded random micro-batches, the second's `mx.get_peak_memory()` less what was
    allocated before the model was built and less the batches (tests/test_memory.py holds the
    plan to PLAN_TOL of it)."""
    import gc

    import mlx.core as mx
    import numpy as np

    from mlx_model.memory import plan_memory
    from mlx_model.presets import preset
    from mlx_model.train import build_model
    from mlx_model.train_config import TrainConfig, training_preset
    from mlx_model.trainer import Trainer

    cfg = TrainConfig(**{**training_preset(name), "progress": False, **overrides})
    args = preset(name)
    gc.collect()
    before = mx.get_active_memory()  # arrays others left alive in this process
    trainer = Trainer(cfg, args, build_model(cfg, args))
    rng = np.random.default_rng(seed)
    shape = (cfg.batch_size, cfg.seq_len + 1)
    data = [
        mx.array(rng.integers(0, args.vocab_size, shape).astype(np.int32)) for _ in range(cfg.accum)
    ]
    trainer.step(data)  # compiles
    mx.reset_peak_memory()
    trainer.step(data)
    measured = mx.get_peak_memory() - before - sum(b.nbytes for b in data)
    plan = plan_memory(args, cfg, trainer.lanes).total
    return dict(preset=name, overrides=overrides, lanes=trainer.lanes, plan=plan, measured=measured,
                batch=f"B{cfg.batch_size} x T{cfg.seq_len} x accum {cfg.accum}")  # fmt: skip


def _value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tools.plan_check", description=__doc__.split("\n")[0]
    )
    p.add_argument("presets", nargs="+", help="model presets (tiny, small, small-dense, seed, ...)")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="TrainConfig overrides, e.g. batch_size=32",
    )
    p.add_argument(
        "--worker", action="store_true", help="internal: measure the first preset here, print JSON"
    )
    a = p.parse_args(argv)
    overrides = {k: _value(v) for k, v in (s.split("=", 1) for s in a.set)}
    if a.worker:
        from mlx_model.speedups import enable

        enable()
        print(json.dumps(measure(a.presets[0], overrides)))
        return
    for name in a.presets:
        cmd = [sys.executable, "-m", "tools.plan_check", name, "--worker", "--set", *a.set]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name}: failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{name:12} {r['batch']:22} lanes {r['lanes']}: plan {r['plan'] / 1e6:8.1f} MB  "
            f"measured {r['measured'] / 1e6:8.1f} MB  plan/measured {r['plan'] / r['measured']:.2f}"
        )


if __name__ == "__main__":
    main()
