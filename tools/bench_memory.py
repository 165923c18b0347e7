"""`python -m tools.bench memory --preset P`: peak training memory and tokens/s side by side.

Contenders, each in its own process, at the same batch, from one random checkpoint: ours, ours
with --grad-checkpoint, the PyTorch twin, mlx-lm's `deepseek_v3` (and with its own
`grad_checkpoint`) where the preset has a deepseek_v3 form; plus our plan's estimate. Memory:
MLX's allocator peak over the timed steps (`mx.get_peak_memory`, which counts parameters,
optimizer state, gradients and activations), and for every contender the growth of the
process's max resident set over its baseline (the only figure torch on a CPU has).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONTENDERS = {  # label -> (worker name, grad checkpointing)
    "ours": ("mlx_model", False),
    "ours + checkpointing": ("mlx_model", True),
    "torch twin": ("torch_reference", False),
    "mlx-lm": ("mlx_lm", False),
    "mlx-lm + checkpointing": ("mlx_lm", True),
}


def worker(name: str, ckpt: str, spec_json: str) -> None:
    """One contender: build, warm up, reset the peak, time `steps` steps, print one JSON line."""
    from tools.bench_workers import TrainWorker, speed_setup

    spec = json.loads(spec_json)
    speed_setup(name, spec)
    if name != "torch_reference":
        import mlx.core as mx
    else:
        mx = None
    from tools.bench_measure import max_rss_bytes, rss_bytes

    if name == "torch_reference":
        import torch  # noqa: F401  (its import is not its footprint)
    base = rss_bytes()
    w = TrainWorker(name, ckpt, spec)
    for _ in range(spec["warmup"]):
        w.run()
    if mx is not None:
        mx.reset_peak_memory()
    t = time.perf_counter()
    for _ in range(spec["steps"]):
        w.run()
    dt = (time.perf_counter() - t) / spec["steps"]
    tokens = spec["batch_size"] * spec["seq_len"] * spec["accum"]
    out = {"tokens_per_s": tokens / dt, "rss_growth": max_rss_bytes() - base}
    if mx is not None:
        out["mlx_peak"] = int(mx.get_peak_memory())
    print(json.dumps(out), flush=True)


def run_contender(name: str, ckpt: str, spec: dict) -> dict:
    env = dict(os.environ)
    if name == "torch_reference":
        env["MLX_MODEL_BLAS"] = "none"  # keep MKL's global symbols out of torch's process
    root = str(Path(__file__).resolve().parents[1])
    cmd = [sys.executable, "-m", "tools.bench_memory", "_worker", name, ckpt, json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
    if r.returncode != 0:
        tail = r.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0][:120]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench(a: argparse.Namespace) -> dict:
    from mlx_model.hf import hf_incompatibility
    from mlx_model.memory import plan_memory
    from mlx_model.presets import preset
    from mlx_model.train_config import TrainConfig, training_preset
    from tools.bench_measure import cpu_model
    from tools.bench_workers import make_checkpoint

    load = os.getloadavg()[0]
    tr = {"batch_size": 16, "seq_len": 128, "accum": 1} | {
        k: v
        for k, v in training_preset(a.preset).items()
        if k
        in ("batch_size", "seq_len", "accum", "moments_dtype", "second_moment", "update_chunk_mb")
    }
    for k in ("batch_size", "seq_len", "accum"):
        if getattr(a, k):
            tr[k] = getattr(a, k)
    args = preset(a.preset)
    spec = dict(preset=a.preset, dtype="float32", lanes=1, warmup=a.warmup, steps=a.steps, **tr)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        make_checkpoint(a.preset, tmp, {})
        for label, (name, ckpt) in CONTENDERS.items():
            if name == "mlx_lm" and hf_incompatibility(args):
                rows[label] = {"error": f"not expressible: {hf_incompatibility(args)}"}
                continue
            print(f"  {label} ...", file=sys.stderr, flush=True)
            rows[label] = run_contender(name, tmp, {**spec, "grad_checkpoint": ckpt})
    for label, ck in (("ours", False), ("ours + checkpointing", True)):
        cfg = TrainConfig(**{k: v for k, v in spec.items() if k in TrainConfig.__annotations__})
        cfg.grad_checkpoint = ck
        rows[label]["plan"] = plan_memory(args, cfg, 1).total
    machine = f"{cpu_model()}, {os.cpu_count()} cores, 1-minute load average {load:.1f} before"
    machine += f", {os.getloadavg()[0]:.1f} after (tokens/s: processes run one after another)"
    return {"preset": a.preset, "spec": spec, "rows": rows, "machine": machine}


def print_table(res: dict) -> None:
    s = res["spec"]
    print(
        f"preset {res['preset']}: batch {s['batch_size']} x {s['seq_len']} x accum {s['accum']}, "
        f"float32, 1 lane, {s['steps']} timed steps"
    )
    if "machine" in res:
        print(f"machine: {res['machine']}")
    print(f"{'':24} {'MLX peak':>10} {'plan':>10} {'RSS growth':>11} {'tokens/s':>9}")
    rows = res["rows"]
    for label, r in rows.items():
        if "error" in r:
            print(f"{label:24} {r['error']}")
            continue
        peak = f"{r['mlx_peak'] / 1e6:.0f} MB" if "mlx_peak" in r else "-"
        plan = f"{r['plan'] / 1e6:.0f} MB" if "plan" in r else "-"
        print(
            f"{label:24} {peak:>10} {plan:>10} {r['rss_growth'] / 1e6:>8.0f} MB "
            f"{r['tokens_per_s']:>9.0f}"
        )
    ours, ck, lm = rows.get("ours", {}), rows.get("ours + checkpointing", {}), rows.get("mlx-lm")
    if "mlx_peak" in ours and lm and "mlx_peak" in lm:
        print(f"ours / mlx-lm peak: {ours['mlx_peak'] / lm['mlx_peak']:.2f}x")
    if "mlx_peak" in ours and "mlx_peak" in ck:
        print(
            f"checkpointing: peak {ck['mlx_peak'] / ours['mlx_peak']:.2f}x, "
            f"time {ours['tokens_per_s'] / ck['tokens_per_s']:.2f}x"
        )
    for label in ("ours", "ours + checkpointing"):
        r = rows.get(label, {})
        if "mlx_peak" in r:
            print(f"plan / measured ({label}): {r['plan'] / r['mlx_peak']:.2f}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        worker(*argv[1:4])
        return
    from mlx_model.speedups import enable_for_cli

    enable_for_cli()  # before the coordinator imports mlx.core (it writes the checkpoint)
    from mlx_model.presets import PRESETS

    p = argparse.ArgumentParser(
        prog="python -m tools.bench memory", description=__doc__.split("\n")[0]
    )
    p.add_argument("--preset", default="small", choices=list(PRESETS), help="model preset")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch (default: preset)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: preset)")
    p.add_argument("--accum", type=int, help="micro-batches per step (default: preset)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per contender (compile)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per contender")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    res = bench(a)
    print_table(res)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
