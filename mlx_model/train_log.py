"""What a training run reports: the set-up and done lines (stderr), the progress bar, and
metrics.jsonl (one JSON line per logged step or evaluation, written by rank 0)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from mlx.utils import tree_flatten

from .config import ModelArgs
from .model import Model
from .train_config import TrainConfig


def print_setup(
    cfg: TrainConfig, args: ModelArgs, model: Model, n_train: int, n_val: int, world: int
) -> None:
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(
        f"model: {n_params / 1e6:.2f}M parameters, {args.attention_type.upper()}, "
        f"{args.n_routed_experts} routed experts (top-{args.num_experts_per_tok}); "
        f"data: {n_train} train / {n_val} val tokens; world size {world}",
        file=sys.stderr,
    )
    config = {"train": dataclasses.asdict(cfg), "model": args.to_dict()}
    print("config: " + json.dumps(config), file=sys.stderr)


class MetricsLog:
    """metrics.jsonl, written by rank 0 only. A resumed run keeps the lines up to the step it
    starts from and rewrites the rest."""

    def __init__(self, out: Path, resume: str | None, start: int, enabled: bool):
        self.f = None
        if not enabled:
            return
        path = out / "metrics.jsonl"
        src = Path(resume) / "metrics.jsonl" if resume else path
        kept = []
        if start and src.is_file():
            kept = [ln for ln in src.read_text().splitlines() if json.loads(ln)["step"] <= start]
        self.f = open(path, "w")
        self.f.writelines(ln + "\n" for ln in kept)

    def __call__(self, rec: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


_LOGGED = ("step", "loss", "ce", "ppl", "lr", "tokens_per_s", "grad_norm", "balance", "mtp")
_LOGGED += ("expert_load_max_over_mean", "expert_load", "dropped_fraction")
_LOGGED += ("peak_memory_bytes", "steps_per_s")


def train_record(m: dict) -> dict:
    """The metrics.jsonl line of a training step: the logged keys that this run has."""
    return {k: m[k] for k in _LOGGED if k in m}


def progress_bar(cfg: TrainConfig, rank: int, start: int) -> Any:
    if rank != 0 or not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(
        total=cfg.max_steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr
    )


def show_progress(bar: Any, m: dict, last: dict, lr: float) -> None:
    if bar is None:
        return
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


def print_done(last: dict, step: int, out: Path) -> None:
    nan = float("nan")
    print(
        f"done: step {step}, ce {last.get('ce', nan):.4f}, val_ce {last.get('val_ce', nan):.4f}"
        f" (ppl {last.get('val_ppl', nan):.2f}); checkpoint in {out}",
        file=sys.stderr,
    )
