"""Train several configurations on the same data and compare them: one table and one PNG.

    python -m tools.compare --out runs/cmp --steps 500 \\
        --run "moe: --preset small" --run "dense: --preset small-dense" [--data FILE ...]

Each run is an ordinary training directory OUT/NAME written by `python -m mlx_model.train` (a
subprocess; the trainer is not copied) with the run's own flags plus --max-steps, --eval-every,
--log-every 1 (every step's own seconds land in metrics.jsonl) and the shared --data and
--cache-dir. Every run reads the same token stream and the same validation tail (same data,
--val-fraction and --seq-len; the table says whether their tokenizers are identical).
Runs are resumable: a run that reached its target step is read, not retrained; an unfinished
one continues with --resume (from its last checkpoint). OUT/NAME.json keeps the run's flags;
a different command line for an existing run is refused.

Seconds are each run's own training time (the sum of its steps; evaluation, saving and the
first step's kernel compilation excluded: step 1 counts as the median step), so "equal
wall-clock" compares runs at the same training seconds even when they did not run side by
side. On a shared machine the load changes those seconds: run the contenders together
(--jobs N) so that they see the same load, and read the machine load printed with the
table. The table:
  params: total parameters (embedding included; MTP modules excluded);
  active: parameters one token uses (all but the routed experts it did not choose);
  tok/s: tokens trained / training seconds;
  val@tokens: validation CE at the largest token count every run reached;
  val@time: validation CE at the shortest run's training seconds (linear between evaluations);
  load: worst MoE layer's max/mean expert load, mean over the last 10% of steps;
  balanced@: first step from which the worst layer's max/mean load, averaged over a trailing
  10-step window, is <= --balanced (1.3) ("-" if never; dense runs have no load);
  dropped: mean fraction of (token, expert) slots dropped by the capacity factor.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class CompareError(ValueError):
    """Bad input: one line naming the problem and the fix."""


def parse_run(spec: str) -> tuple[str, list[str]]:
    """'name: --flag value ...' -> (name, flags)."""
    name, sep, flags = spec.partition(":")
    name = name.strip()
    if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise CompareError(
            f"--run {spec!r}: write it as 'NAME: --train-flag value ...' with NAME made of "
            "letters, digits, - and _"
        )
    return name, shlex.split(flags)


def run_state(d: Path) -> int:
    """The step a training directory has saved (0 if none)."""
    f = d / "trainer_state.json"
    return json.loads(f.read_text())["step"] if f.is_file() else 0


def train_command(a: argparse.Namespace, d: Path, flags: list[str], target: int) -> list[str]:
    cmd = [sys.executable, "-m", "mlx_model.train", "--out", str(d), *flags]
    cmd += ["--max-steps", str(a.steps), "--eval-every", str(a.eval_every), "--log-every", "1"]
    cmd += ["--progress", "false", "--stop-at", str(target)]
    if a.data:
        cmd += ["--data", *a.data]
    if a.cache_dir:
        cmd += ["--cache-dir", a.cache_dir]
    if run_state(d):
        cmd += ["--resume", str(d)]
    return cmd


def check_recorded(out: Path, name: str, flags: list[str], a: argparse.Namespace) -> None:
    """Refuse to continue a run that was started with another command line."""
    rec = {"flags": flags, "steps": a.steps, "eval_every": a.eval_every, "data": a.data}
    f = out / f"{name}.json"
    if f.is_file():
        old = json.loads(f.read_text())
        if old != rec:
            raise CompareError(
                f"run {name!r} in {out} was started as {old}, now asked as {rec}: use another "
                f"--out or another run name (or delete {out / name})"
            )
    elif run_state(out / name):
        raise CompareError(
            f"{out / name} holds a training run that this tool did not start: use another --out"
        )
    else:
        f.write_text(json.dumps(rec) + "\n")


def train_all(a: argparse.Namespace, runs: dict[str, list[str]], out: Path) -> None:
    """Train (or continue) every run to its target step, up to --jobs at a time."""
    target = min(a.stop_at, a.steps) if a.stop_at > 0 else a.steps
    todo = [n for n in runs if run_state(out / n) < target]
    for n in runs:
        if n not in todo:
            print(f"{n}: done (step {run_state(out / n)}), not retrained", file=sys.stderr)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    active: dict[str, tuple[subprocess.Popen, Any]] = {}
    failed = []
    while todo or active:
        while todo and len(active) < a.jobs:
            n = todo.pop(0)
            cmd = train_command(a, out / n, runs[n], target)
            print(f"{n}: {shlex.join(cmd[1:])}", file=sys.stderr, flush=True)
            log = open(out / f"{n}.log", "a")
            active[n] = (subprocess.Popen(cmd, stdout=log, stderr=log, cwd=ROOT, env=env), log)
        time.sleep(0.5)
        for n, (p, log) in list(active.items()):
            if p.poll() is None:
                continue
            log.close()
            del active[n]
            if p.returncode != 0:
                tail = (out / f"{n}.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
                failed.append(f"run {n!r} failed (exit {p.returncode}): {tail[0]}")
            else:
                print(f"{n}: trained to step {run_state(out / n)}", file=sys.stderr, flush=True)
    if failed:
        raise CompareError("; ".join(failed) + f" (full logs in {out})")


# ------------------------------------------------------------------------- reading
def param_counts(d: Path) -> tuple[int, int]:
    """(total, active per token) from the checkpoint's tensors and config."""
    import mlx.core as mx

    cfg = json.loads((d / "config.json").read_text())
    E, k = cfg.get("n_routed_experts") or 0, cfg.get("num_experts_per_tok") or 0
    total = routed = 0
    for name, w in mx.load(str(d / "model.safetensors")).items():
        total += w.size
        if ".mlp.experts." in name:
            routed += w.size
    active = total - (routed - routed * k // E if E else 0)
    return total, active


def interp(xs: list[float], ys: list[float], x: float) -> float | None:
    """Linear interpolation of (xs, ys) at x; None outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] - 1e-9 or x > xs[-1] + 1e-9:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i] + 1e-9:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def read_run(d: Path) -> dict[str, Any]:
    """Curves and figures of one training directory."""
    state = json.loads((d / "trainer_state.json").read_text())
    tc = state["train_config"]
    tokens_per_step = tc["batch_size"] * tc["seq_len"] * tc["accum"] * state.get("world_size", 1)
    rows = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines() if ln]
    train = {r["step"]: r for r in rows if "ce" in r}
    evals = [r for r in rows if "val_ce" in r]
    last = state["step"]
    dts = {s: 1.0 / r["steps_per_s"] for s, r in train.items() if "steps_per_s" in r}
    later = sorted(v for s, v in dts.items() if s > 1) or sorted(dts.values()) or [0.0]
    typical = later[len(later) // 2]
    seconds, t = {0: 0.0}, 0.0
    for s in range(1, last + 1):
        # Step 1 (kernel compilation, whose cost depends on the on-disk kernel cache) and any
        # step missing from the log count as the median step.
        t += dts[s] if s > 1 and s in dts else typical
        seconds[s] = t
    total, active = param_counts(d)
    worst = [max(train[s]["expert_load"]) for s in sorted(train) if train[s].get("expert_load")]
    run = {
        "steps": last,
        "tokens": last * tokens_per_step,
        "seconds": seconds[last],
        "tokens_per_s": last * tokens_per_step / max(seconds[last], 1e-9),
        "params": total,
        "active_params": active,
        "eval_steps": [r["step"] for r in evals],
        "eval_tokens": [r["step"] * tokens_per_step for r in evals],
        "eval_seconds": [seconds[r["step"]] for r in evals],
        "val_ce": [r["val_ce"] for r in evals],
        "worst_load": worst,
        "dropped": [train[s]["dropped_fraction"] for s in train if "dropped_fraction" in train[s]],
    }
    return run


def balanced_at(worst: list[float], limit: float, window: int = 10) -> int | None:
    """First step (1-based) whose trailing `window`-step mean of the worst load is <= limit."""
    for i in range(window - 1, len(worst)):
        if sum(worst[i - window + 1 : i + 1]) / window <= limit:
            return i + 1
    return None


def summarise(runs: dict[str, dict], balanced: float) -> dict[str, Any]:
    """The table's numbers: equal-token and equal-time validation CE, loads, speeds."""
    tok = min(r["tokens"] for r in runs.values())
    sec = min(r["seconds"] for r in runs.values())
    rows = {}
    for n, r in runs.items():
        w = r["worst_load"]
        tail = w[-max(1, len(w) // 10) :] if w else []
        rows[n] = {
            "params": r["params"],
            "active_params": r["active_params"],
            "tokens_per_s": r["tokens_per_s"],
            "val_at_tokens": interp(r["eval_tokens"], r["val_ce"], tok),
            "val_at_seconds": interp(r["eval_seconds"], r["val_ce"], sec),
            "load_end": sum(tail) / len(tail) if tail else None,
            "balanced_at": balanced_at(w, balanced) if w else None,
            "dropped": sum(r["dropped"]) / len(r["dropped"]) if r["dropped"] else None,
            "seconds": r["seconds"],
            "steps": r["steps"],
        }
    return {"equal_tokens": tok, "equal_seconds": sec, "rows": rows}


def print_table(s: dict[str, Any], same_tokenizer: bool, balanced: float) -> None:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    print(
        f"{'run':14s} {'params':>8s} {'active':>8s} {'tok/s':>7s} {'steps':>6s} {'train s':>8s} "
        f"{'val@tokens':>10s} {'val@time':>9s} {'load':>6s} {'balanced@':>9s} {'dropped':>8s}"
    )
    for n, r in s["rows"].items():
        print(
            f"{n:14s} {r['params'] / 1e6:7.2f}M {r['active_params'] / 1e6:7.2f}M "
            f"{r['tokens_per_s']:7.0f} {r['steps']:6d} {r['seconds']:8.1f} "
            f"{f(r['val_at_tokens'], '.4f'):>10s} {f(r['val_at_seconds'], '.4f'):>9s} "
            f"{f(r['load_end'], '.2f'):>6s} {f(r['balanced_at'], 'd'):>9s} "
            f"{f(r['dropped'], '.4f'):>8s}"
        )
    print(
        f"val@tokens: validation CE after {s['equal_tokens']} training tokens; val@time: after "
        f"{s['equal_seconds']:.1f} s of each run's own training time; load: worst layer's max/mean "
        f"expert load, last 10% of steps; balanced@: first step with its 10-step mean <= {balanced}"
    )
    print(f"same tokenizer and token stream in every run: {'yes' if same_tokenizer else 'NO'}")


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for n, r in runs.items():
        ax1.plot(r["eval_tokens"], r["val_ce"], marker="o", ms=3, label=n)
        ax2.plot(r["eval_seconds"], r["val_ce"], marker="o", ms=3, label=n)
    ax1.set(xlabel="training tokens", ylabel="validation CE", title="at equal tokens")
    ax2.set(xlabel="training seconds (each run's own)", title="at equal wall-clock")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.compare", description=__doc__.split("\n")[0])
    p.add_argument(
        "--run",
        action="append",
        required=True,
        help="'NAME: --train-flag value ...' (repeat; flags of python -m mlx_model.train)",
    )
    p.add_argument("--out", required=True, help="directory holding one training run per NAME")
    p.add_argument("--steps", type=int, required=True, help="--max-steps of every run")
    p.add_argument("--stop-at", type=int, default=0, help="train only to this step (0: --steps)")
    p.add_argument("--eval-every", type=int, default=25, help="steps between validation passes")
    p.add_argument("--data", nargs="+", help="text files, directories or .jsonl (default: pydoc)")
    p.add_argument("--cache-dir", help="tokenized-data cache shared by the runs")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    p.add_argument("--balanced", type=float, default=1.3, help="max/mean load counted as balanced")
    p.add_argument("--png", help="plot path (default OUT/compare.png)")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    try:
        runs = dict(parse_run(s) for s in a.run)
        if len(runs) != len(a.run):
            raise CompareError("two --run entries have the same NAME: give each run its own")
        for key in ("steps", "eval_every", "jobs"):
            if getattr(a, key) <= 0:
                raise CompareError(f"--{key.replace('_', '-')} must be a positive integer")
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for n, flags in runs.items():
            check_recorded(out, n, flags, a)
        load_before = os.getloadavg()[0]
        train_all(a, runs, out)
        data = {n: read_run(out / n) for n in runs}
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    toks = {(out / n / "tokenizer.json").read_bytes() for n in runs}
    s = summarise(data, a.balanced)
    print_table(s, len(toks) == 1, a.balanced)
    print(
        f"machine: {os.cpu_count()} cores; 1-minute load average {load_before:.1f} before "
        f"training, {os.getloadavg()[0]:.1f} after"
    )
    png = Path(a.png) if a.png else out / "compare.png"
    plot(data, png)
    (out / "compare.json").write_text(json.dumps({"summary": s, "runs": data}, indent=1) + "\n")
    print(f"plot: {png}; numbers: {out / 'compare.json'}")


if __name__ == "__main__":
    main()
