"""Side-by-side throughput: our MLX model, its PyTorch twin, and mlx-lm's deepseek_v3, one table.

    python -m tools.bench train --preset small [--repeats 5] [--json OUT]
    python -m tools.bench generate [--prompt-len 128] [--new-tokens 256] [--num-draft 2]
    (generate: tools/bench_generate.py, on a trained fixture)
    python -m tools.bench data [--size-mb 1000] [--files 10000]   (tools/bench_data.py)

Every contender runs in its own worker process, built from the SAME checkpoint (written once
here from a seeded MLX model): mlx_model (its real compiled Trainer step), torch_reference
(same weights, torch.optim.AdamW, all CPU threads) and mlx_lm (`mlx_lm.models.deepseek_v3`
through its own sanitize/load_weights, value_and_grad + AdamW compiled as mlx-lm's trainer
does; only for configs mlx-lm can express). The workers are INTERLEAVED: each round asks every
worker for one timed step (round-robin, rotating the order), and figures are medians over
rounds, so a machine whose load changes affects every contender alike. A "peak" worker times a
float32 matmul in each round; MFU = useful FLOP/s / that peak.

Useful FLOPs per trained token (analytic): 6 * active parameters (every matrix except the
embedding; of the routed experts only k of E count, never dense-masked waste) + attention
scores 3 * layers * heads * (qk_head_dim + v_head_dim) * (T + 1) (causal: (T+1)/2 keys on
average, 2 FLOPs per multiply-add, x3 for forward + backward).
The workers' side is tools/bench_workers.py; the worker processes are run by tools/bench_procs.py,
and what a process measures about itself is in tools/bench_measure.py.
Peak memory: the high-water resident set (ru_maxrss) of the contender's own process minus its
resident set after imports, i.e. what building, compiling and running the contender added; on
a GPU, MLX contenders report mx.get_peak_memory() instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tools.bench_generate import GenWorker, bench_generate, print_generate
from tools.bench_measure import (
    active_params,
    cache_bytes_per_token,
    cpu_model,
    median,
    useful_flops_per_token,
)
from tools.bench_procs import Proc, interleave
from tools.bench_workers import make_checkpoint, worker_main

# Figures measured elsewhere, never in this run: printed with their source and machine, and never
# turned into a ratio (ratios are side-by-side contenders only). (micro-batches/s, where, source)
SEED_FIGURES = (
    (5.2, "a 2-core AMD EPYC (Zen 2), 2026-11-27", "SEED-NOTES.md"),
    (8.9, "a 2-core Intel Xeon with AVX-512, 2026-11-30", "SEED-NOTES.md"),
    (25.0, "an Apple M2", "the seed's README"),
)
NAMES = ("mlx_model", "torch_reference", "mlx_lm")


# -------------------------------------------------------------------------- coordinator
def device_label() -> dict:
    import mlx.core as mx

    dev = mx.default_device()
    label = {
        "mlx_device": str(dev),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
    }
    try:
        label["gpu"] = mx.device_info().get("device_name") if dev == mx.gpu else None
    except Exception:
        label["gpu"] = None
    return label


def bench(a: argparse.Namespace) -> dict:
    from mlx.utils import tree_flatten

    from mlx_model.hf import hf_incompatibility
    from mlx_model.train_config import training_preset

    tr = {"batch_size": 16, "seq_len": 128, "accum": 1} | {
        k: v
        for k, v in training_preset(a.preset).items()
        if k in ("batch_size", "seq_len", "accum")
    }
    for k in ("batch_size", "seq_len", "accum"):
        if getattr(a, k, None):
            tr[k] = getattr(a, k)
    tmp = tempfile.TemporaryDirectory(prefix="bench-")
    model = make_checkpoint(a.preset, tmp.name, {})
    args = model.args
    names = [n for n in (a.only or NAMES)]
    if hf_incompatibility(args) is not None and "mlx_lm" in names:
        print(f"mlx_lm skipped: {hf_incompatibility(args)}", file=sys.stderr)
        names.remove("mlx_lm")
    if a.cmd == "generate":  # the twin has no KV cache; the dense baseline is a training contender
        names = [n for n in names if n not in ("torch_reference", "mlx_dense")]
    spec = dict(
        preset=a.preset,
        dtype=a.dtype,
        warmup=a.warmup,
        dispatch=a.dispatch,
        lanes=a.lanes,
        **tr,
        mlx_blas_threads=a.mlx_blas_threads,
        prompt_len=a.prompt_len,
        new_tokens=a.new_tokens,
    )
    procs: list[Proc] = []
    try:
        for n in names + (["peak"] if a.cmd == "train" else []):
            print(f"starting {n} ...", file=sys.stderr, flush=True)
            procs.append(Proc(a.cmd, n, tmp.name, spec))
        runs = interleave(procs, a.repeats)
        finals = {p.name: p.close() for p in procs}
    finally:
        for p in procs:
            if p.p.poll() is None:
                p.p.kill()
        tmp.cleanup()
    blas = {p.name: p.info.get("blas") for p in procs}
    out: dict[str, Any] = {"device": device_label() | {"blas": blas}, "preset": a.preset}
    weights = dict(tree_flatten(model.parameters()))
    if a.cmd == "train":
        T, A, B = tr["seq_len"], tr["accum"], tr["batch_size"]
        tokens = B * T * A
        fpt = useful_flops_per_token(args, T, active_params(weights, args))
        peaks = [max(r["mlx"], r.get("torch", 0.0)) for r in runs["peak"]]
        peak = median(peaks)
        out["train"] = {}
        for n in names:
            sec = median([r["seconds"] for r in runs[n]])
            out["train"][n] = {
                "tokens_per_s": tokens / sec,
                "mfu": tokens / sec * fpt / peak,
                "peak_memory_bytes": finals[n]["peak_memory_bytes"],
            }
        out["extra"] = {
            "batch": [B, T, A],
            "flops_per_token": fpt,
            "matmul_peak_flops": peak,
            "peak_mlx": median([r["mlx"] for r in runs["peak"]]),
            "peak_torch": median([r.get("torch", 0.0) for r in runs["peak"]]),
            "step_seconds": {n: median([r["seconds"] for r in runs[n]]) for n in names},
            "step_seconds_all": {n: [round(r["seconds"], 4) for r in runs[n]] for n in names},
            "step_cpu_seconds": {n: median([r["cpu_seconds"] for r in runs[n]]) for n in names},
        }
        if a.preset == "seed":
            sec = median([r["seconds"] for r in runs["mlx_model"]])
            out["extra"]["seed_micro_batches_per_s"] = A / sec
    else:
        out["generate"] = {
            n: {
                "tokens_per_s": median([r["tokens_per_s"] for r in runs[n]]),
                "peak_memory_bytes": finals[n]["peak_memory_bytes"],
            }
            for n in names
        }
        out["extra"] = {
            "prompt_len": a.prompt_len,
            "new_tokens": a.new_tokens,
            "measured_cache_bytes_per_token": {n: finals[n]["cache_bytes"] for n in names},
        }
        if len(names) > 1:
            same = finals[names[0]]["tokens"] == finals[names[1]]["tokens"]
            out["extra"]["same_greedy_tokens_first_64"] = same
    import mlx.core as mx

    half = a.dtype == "bfloat16" or (a.dtype == "auto" and mx.default_device() == mx.gpu)
    out["cache_bytes_per_token"] = cache_bytes_per_token(args, 2 if half else 4)
    return out


def print_table(res: dict, repeats: int) -> None:
    d, x = res["device"], res["extra"]
    print(
        f"device: MLX {d['mlx_device']} | {d['cpu']}, {d['cores']} cores"
        + (f" | GPU {d['gpu']}" if d.get("gpu") else "")
        + f" | mlx {d['mlx']}"
    )
    print("BLAS mapped per process: " + "; ".join(f"{k}: {v}" for k, v in d["blas"].items()))
    print(
        f"preset {res['preset']}; median of {repeats} interleaved rounds (round-robin, rotating order)"
    )
    if "train" in res:
        B, T, A = x["batch"]
        base = res["train"]
        print(
            f"train: batch {B} x seq {T} x accum {A} = {B * T * A} tokens/step, float32 unless --dtype; "
            f"useful FLOPs/token {x['flops_per_token'] / 1e6:.1f}M; matmul peak (fp32 2048^2, median) "
            f"{x['matmul_peak_flops'] / 1e9:.1f} GFLOP/s "
            f"(mlx {x['peak_mlx'] / 1e9:.1f}, torch {x['peak_torch'] / 1e9:.1f})"
        )
        print(
            f"{'contender':16s} {'tokens/s':>10s} {'s/step':>8s} {'(min-max)':>13s} {'GFLOP/s':>8s} {'MFU':>6s} "
            f"{'peak mem':>10s}  ours/this"
        )
        ours = base.get("mlx_model", {}).get("tokens_per_s")
        for n, r in base.items():
            ratio = f"{ours / r['tokens_per_s']:.2f}x" if ours and n != "mlx_model" else ""
            runs = x["step_seconds_all"][n]
            spread = f"({min(runs):.2f}-{max(runs):.2f})"
            print(
                f"{n:16s} {r['tokens_per_s']:10.0f} {x['step_seconds'][n]:8.3f} {spread:>13s} "
                f"{r['tokens_per_s'] * x['flops_per_token'] / 1e9:8.1f} {100 * r['mfu']:5.1f}% "
                f"{r['peak_memory_bytes'] / 2**20:8.0f}MB  {ratio}"
            )
        if ours and "mlx_dense" in base:
            cpu = x["step_cpu_seconds"]
            print(
                f"MoE vs dense at equal active parameters: mlx_model / mlx_dense tokens/s = "
                f"{ours / base['mlx_dense']['tokens_per_s']:.2f}x (by CPU seconds per step, "
                f"which other processes' load disturbs less: "
                f"{cpu['mlx_dense'] / cpu['mlx_model']:.2f}x)"
            )
        if "seed_micro_batches_per_s" in x:
            m = x["seed_micro_batches_per_s"]
            elsewhere = "; ".join(f"{v:g}/s on {where} ({src})" for v, where, src in SEED_FIGURES)
            print(
                f"seed loop (fwd+bwd per micro-batch, AdamW every {A}th): ours {m:.2f} micro-batches/s "
                f"in this run. The seed's own code in micro-batches/s, measured elsewhere, not in this run "
                f"(other machines, so no ratio): {elsewhere}"
            )
        print(
            "peak mem: ru_maxrss of the contender's own process minus its RSS after imports "
            "(MLX on GPU: mx.get_peak_memory)"
        )
    else:
        print(
            f"generate: batch 1, prompt {x['prompt_len']}, {x['new_tokens']} new tokens, greedy; decode tokens/s "
            "(prefill excluded)"
        )
        print(
            f"{'contender':16s} {'tokens/s':>10s} {'peak mem':>10s} {'cache B/token':>14s}  ours/this"
        )
        ours = res["generate"].get("mlx_model", {}).get("tokens_per_s")
        for n, r in res["generate"].items():
            ratio = f"{ours / r['tokens_per_s']:.2f}x" if ours and n != "mlx_model" else ""
            print(
                f"{n:16s} {r['tokens_per_s']:10.1f} {r['peak_memory_bytes'] / 2**20:8.0f}MB "
                f"{x['measured_cache_bytes_per_token'][n]:14d}  {ratio}"
            )
        if "same_greedy_tokens_first_64" in x:
            print(f"same greedy tokens (first 64): {x['same_greedy_tokens_first_64']}")
    c = res["cache_bytes_per_token"]
    print(
        f"cache bytes/token (all layers): latent {c['latent']} vs expanded multi-head {c['expanded']} "
        f"({c['expanded'] / c['latent']:.1f}x); latent = layers*(kv_lora_rank+qk_rope_head_dim)*bytes "
        "(MQA: layers*2*head_dim*bytes), expanded = layers*heads*(qk_head_dim+v_head_dim)*bytes"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "memory":  # peak training memory side by side: tools/bench_memory.py
        from tools.bench_memory import main as memory_main

        memory_main(argv[1:])
        return
    if argv and argv[0] == "data":  # data preparation: its own module
        from tools.bench_data import main as data_main

        return data_main(argv[1:])
    if argv and argv[0] == "_worker":
        worker_main(*argv[1:5], cls=GenWorker if argv[1] == "gen" else None)
        return
    from mlx_model.speedups import enable_for_cli

    enable_for_cli()  # before the coordinator imports mlx.core (it writes the checkpoint)
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n")[0])
    p.add_argument("cmd", choices=["train", "generate"], help="what to measure")
    p.add_argument(
        "--preset",
        default="small",
        choices=["tiny", "small", "seed"],
        help="model and batch preset",
    )
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per contender (compile)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--batch-size", type=int, help="rows per micro-batch (default: the preset's)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: the preset's)")
    p.add_argument("--accum", type=int, help="micro-batches per optimizer step (default: preset)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", "float32", "bfloat16"],
        help="our training dtype (auto: bfloat16 on GPU, float32 on CPU)",
    )
    p.add_argument("--dispatch", choices=["dense", "gather"], help="force our expert dispatch")
    p.add_argument(
        "--lanes",
        type=int,
        default=0,
        help="our trainer's parallel CPU lanes (default 0: its automatic choice; 1: one stream)",
    )
    p.add_argument("--prompt-len", type=int, default=128, help="generate: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256, help="generate: tokens decoded")
    p.add_argument(
        "--only",
        nargs="+",
        choices=[*NAMES, "mlx_dense"],
        help="contenders to run; mlx_dense (train only, not by default): our trainer on the dense "
        "model of the same active parameters, so 'ours/this' is the MoE/dense speed ratio",
    )
    p.add_argument(
        "--mlx-blas-threads",
        type=int,
        help="MKL/OpenBLAS threads for the MLX contenders (default: the library's own choice)",
    )
    p.add_argument(
        "--num-draft", type=int, default=1, help="generate: speculative tokens drafted per step"
    )
    a = p.parse_args(argv)
    t = time.perf_counter()
    if a.cmd == "generate":  # trained fixtures, speculative and quantized rows
        res = bench_generate(a)
        print_generate(res)
        print(f"(bench wall time {time.perf_counter() - t:.0f} s)")
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
        return
    res = bench(a)
    print_table(res, a.repeats)
    print(f"(bench wall time {time.perf_counter() - t:.0f} s)")
    if a.json:
        keep = {
            k: res[k]
            for k in ("device", "preset", "train", "generate", "cache_bytes_per_token")
            if k in res
        }
        keep.setdefault("train", {})
        keep.setdefault("generate", {})
        Path(a.json).write_text(json.dumps(keep, indent=2) + "\n")


if __name__ == "__main__":
    main()
