"""Pictures of a training run: `python -m tools.plot DIR [--out-dir DIR]`.

Reads DIR/metrics.jsonl and writes loss.png (train CE and validation CE), lr.png and
expert_load.png (max/mean expert load per MoE layer). Needs matplotlib (`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    if not f.is_file():
        raise FileNotFoundError(
            f"{f} not found: pass a directory written by python -m mlx_model.train"
        )
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def plot(run: Path, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run)
    train = [r for r in rows if "ce" in r]
    val = [r for r in rows if "val_ce" in r]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [r["ce"] for r in train], label="train CE")
    if val:
        ax.plot([r["step"] for r in val], [r["val_ce"] for r in val], "o-", label="validation CE")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats)", title=f"{run.name}: loss")
    ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
    save(fig, "lr.png")

    loads = [r for r in train if "expert_load" in r]
    if loads:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i in range(len(loads[0]["expert_load"])):
            ax.plot(
                [r["step"] for r in loads],
                [r["expert_load"][i] for r in loads],
                label=f"MoE layer {i}",
            )
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set(xlabel="optimizer step", ylabel="max / mean expert load", title="expert balance")
        ax.legend(fontsize=8)
        save(fig, "expert_load.png")
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.plot", description=__doc__.split("\n")[0])
    p.add_argument("run", help="training output directory (holds metrics.jsonl)")
    p.add_argument("--out-dir", help="where to write the PNGs (default: the run directory)")
    a = p.parse_args(argv)
    try:
        for path in plot(Path(a.run), Path(a.out_dir or a.run)):
            print(path)
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ImportError:
        print('error: matplotlib is not installed: pip install -e ".[plot]"', file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
