"""Training checkpoints written whole: a kill -9 at any instant leaves either the previous
complete checkpoint or the new one, never a mix.

A training output directory `out/`:
    checkpoints/step-00000200/   one complete checkpoint, itself a plain checkpoint directory:
                                 config.json, model.safetensors, mtp.safetensors, tokenizer
                                 files, optimizer.safetensors, trainer_state.json
    checkpoints/current          symlink -> step-00000200: the one switch
    config.json, model.safetensors, ...   symlinks -> checkpoints/current/<name>, so `out/` is
                                 a Hugging Face directory (mlx_lm.load, transformers, load_model)
    metrics.jsonl                the trainer's log (not part of a checkpoint)
`save_checkpoint` builds `checkpoints/.tmp-*` completely (every file fsynced), renames it to
`step-N`, then replaces `current` with one rename(2) of a new symlink. Before that rename every
name resolves into the old checkpoint, after it into the new one. A name the old checkpoint
lacked (a first mtp.safetensors) gets its link before the switch (until then the link dangles:
the file reads as absent, as in the old checkpoint); links for names the new one lacks go after
it; then step directories beyond `keep` are removed. A directory holding plain files (an older
version's output, tools.convert's or transformers') is first put into this layout without
changing what it holds: its files are hard-linked into a step directory, `current` points
there, then each file is replaced by its link (same bytes before and after each replacement).

Why this design: recording the step in every file and refusing a mixed set would detect a torn
checkpoint but lose the previous one; swapping whole directories takes two renames (a moment
with nothing at `out`) and would move the metrics log and anything else kept in `out`.
Needs symlinks (Linux, macOS).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .checkpoint import CheckpointError

STEPS = "checkpoints"  # the step directories, inside `out`
CURRENT = "current"
OPTIMIZER = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
# Names at the top of `out` that belong to a checkpoint (so they become links into it).
NAMES = (ckpt.CONFIG, ckpt.WEIGHTS, ckpt.MTP, ckpt.INDEX, OPTIMIZER, TRAINER_STATE)
NAMES += ckpt.SIDE_FILES
SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")
STEP_DIR = re.compile(r"^step-(\d+)(?:-(\d+))?$")


# ----------------------------------------------------------------------------- reading
def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """trainer_state.json of a training output (step, train_config, world_size)."""
    f = Path(path) / TRAINER_STATE
    if not f.is_file():
        raise CheckpointError(
            f"{path} has no trainer_state.json: it is not a resumable training output"
        )
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is damaged ({e}); resume from an earlier copy") from None


def read_optimizer_state(path: str | Path) -> dict[str, Any]:
    """The optimizer state tree saved with a training output."""
    from mlx.utils import tree_unflatten

    f = Path(path) / OPTIMIZER
    if not f.is_file():
        raise CheckpointError(f"{path} has no optimizer.safetensors: cannot resume exactly")
    return tree_unflatten(list(ckpt.read_safetensors(f).items()))


# ----------------------------------------------------------------------------- writing
def save_checkpoint(
    out: str | Path,
    model: Any,
    tokenizer: Any,
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int = 1,
) -> Path:
    """Write one whole checkpoint of a run into `out` (layout above); returns its step dir.

    `optimizer_state` is flat (name -> array); `trainer_state` must hold "step". Keeps the
    `keep` newest step directories. On a write error (a full disk...) raises CheckpointError
    and `out` still holds the previous checkpoint.
    """
    import mlx.core as mx

    out, step = Path(out), int(trainer_state["step"])
    steps = out / STEPS
    try:
        steps.mkdir(parents=True, exist_ok=True)
        for old in [*steps.glob(".tmp-*"), *out.glob(".tmp-link-*")]:  # a killed writer's
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        _adopt_plain_files(out)
        tmp = ckpt.temp_dir(steps, ".tmp-step-")
        try:
            ckpt.save_model(tmp, model, tokenizer)
            opt = dict(optimizer_state)
            ckpt.atomic_write(tmp / OPTIMIZER, lambda t: mx.save_safetensors(t, opt))
            ckpt.write_json(tmp / TRAINER_STATE, trainer_state)
            _fsync_files(tmp)
            final = _free_step_name(steps, step)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(steps)
        names = sorted(p.name for p in final.iterdir())
        _link(out, names)  # new names first: they dangle until the switch
        _point(steps / CURRENT, final.name)  # the switch
    except OSError as e:
        raise CheckpointError(
            f"cannot save the checkpoint of step {step} in {out}: {e.strerror or e}; free disk "
            "space or choose another --out (the checkpoint already there is unchanged)"
        ) from None
    try:  # the new checkpoint is complete: what follows only tidies up
        _unlink_stale(out, set(names))
        _prune(steps, keep, final.name)
    except OSError as e:
        print(
            f"warning: checkpoint of step {step} saved, but tidying {steps} failed: {e}",
            file=sys.stderr,
        )
    return final


def _fsync_files(d: Path) -> None:
    """fsync every file of `d` (the tokenizer writes its own), then `d` itself."""
    for f in d.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(d)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _point(link: Path, target: str) -> None:
    """Make `link` a symlink to `target` in one rename(2) (readers see old or new, never none)."""
    tmp = link.with_name(f".tmp-link-{link.name}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def _target(name: str) -> str:
    return f"{STEPS}/{CURRENT}/{name}"


def _link(out: Path, names: list[str]) -> None:
    """Top-level `name -> checkpoints/current/name` for each of `names` (existing ones stay)."""
    for name in names:
        p = out / name
        if not (p.is_symlink() and os.readlink(p) == _target(name)):
            _point(p, _target(name))


def _unlink_stale(out: Path, keep: set[str]) -> None:
    """Remove our top-level links whose name the current checkpoint lacks."""
    for p in out.iterdir():
        if p.is_symlink() and os.readlink(p) == _target(p.name) and p.name not in keep:
            p.unlink()


def _free_step_name(steps: Path, step: int) -> Path:
    """checkpoints/step-N for a new checkpoint of step N. A step-N that `current` does not
    name (renamed by a writer killed before its switch, or left by a run resumed from an
    earlier step) is removed; if `current` names it (step N saved again), step-N-2, -3, ..."""
    current = os.readlink(steps / CURRENT) if (steps / CURRENT).is_symlink() else None
    final, n = steps / f"step-{step:08d}", 1
    while final.exists() or final.is_symlink():
        if final.name != current:
            _remove(final)
            break
        n += 1
        final = steps / f"step-{step:08d}-{n}"
    return final


def _remove(step_dir: Path) -> None:
    """Delete a step directory, renamed first so that no half-deleted step-N is ever seen."""
    doomed = step_dir.with_name(f".tmp-old-{step_dir.name}")
    os.rename(step_dir, doomed)
    shutil.rmtree(doomed)


def _prune(steps: Path, keep: int, current: str) -> None:
    """Remove step directories beyond the `keep` newest (by step, then save order)."""

    def order(p: Path) -> tuple[int, int]:
        m = STEP_DIR.match(p.name)
        return (int(m.group(1)), int(m.group(2) or 1)) if m else (-1, 0)

    dirs = sorted((p for p in steps.iterdir() if STEP_DIR.match(p.name)), key=order)
    others = [p for p in dirs if p.name != current]
    for old in others[: max(0, len(others) - (keep - 1))]:
        _remove(old)


def _plain(out: Path) -> list[str]:
    """Top-level checkpoint files of `out` that are not our links."""
    found = []
    for p in out.iterdir():
        if p.name in NAMES or SHARD.match(p.name):
            if not (p.is_symlink() and os.readlink(p) == _target(p.name)):
                if p.is_file():
                    found.append(p.name)
    return sorted(found)


def _adopt_plain_files(out: Path) -> None:
    """Put a directory of plain checkpoint files into the step layout, changing no bytes."""
    plain = _plain(out)
    if not plain:
        return
    steps = out / STEPS
    # What the links (if any) resolve to now, plus the plain files: the checkpoint out holds.
    linked = [
        p.name
        for p in out.iterdir()
        if p.is_symlink() and os.readlink(p) == _target(p.name) and p.name not in plain
    ]
    tmp = ckpt.temp_dir(steps, ".tmp-adopt-")
    try:
        for name in plain + [n for n in linked if (out / n).is_file()]:
            src = (out / name).resolve()  # a link's file, not the link (link(2) keeps links)
            try:
                os.link(src, tmp / name)
            except OSError:  # a file system without hard links
                shutil.copy2(src, tmp / name)
        _fsync_files(tmp)
        try:
            step = int(json.loads((tmp / TRAINER_STATE).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            step = 0
        final = _free_step_name(steps, step)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(steps)
    _point(steps / CURRENT, final.name)
    _link(out, sorted(p.name for p in final.iterdir()))  # same bytes behind each name
