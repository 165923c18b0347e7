"""Whole-checkpoint atomicity (mlx_model/train_state.py): a writer killed with SIGKILL at every
file-system step of a save, and in the middle of every file it writes, leaves the previous
complete checkpoint or the new one (byte for byte), and `--resume` from what is left ends
exactly like one uninterrupted run. A full disk while saving: one `error:` line, exit 2, the
previous checkpoint untouched.

The killing runs in one driver process that never runs MLX itself, so it can fork clean
children: one runs the training (the real CLI code, resumed from plain files of a reference
run's step 1) and records each save's inputs and the directory before it; then, for each save
(step 2: adopting the plain files, then saving; step 3: an ordinary save) and each N, a child
loads those inputs, arms a counter on the file-system calls (rename, replace, symlink, unlink,
link, mkdir, rmdir, rmtree, and each file write, before it and half-way through) and SIGKILLs
itself at call N of `save_checkpoint`. Finally a child resumes each killed directory.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "trainer_state.json")
RUN = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--max-steps", "3"]
RUN += ["--save-every", "1", "--eval-every", "3", "--log-every", "1", "--eval-batches", "2"]
BASE, KILLED, LAST = 1, (2, 3), 3  # resume from step 1; kill the saves of steps 2 and 3
RUN += ["--compile", "false", "--lanes", "1", "--progress", "false"]
METRICS = ("ce", "loss", "lr", "grad_norm", "val_ce")


def snapshot(d: Path) -> dict[str, object]:
    """What a reader of `d` sees: every checkpoint file by name (links followed), as content
    (tensors by name, JSON parsed) so that equal checkpoints compare equal."""
    from safetensors.numpy import load_file

    from mlx_model.train_state import NAMES

    out: dict[str, object] = {}
    for name in NAMES:
        p = d / name
        if not p.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                tensors = load_file(p).items()
                out[name] = {k: (str(v.dtype), v.shape, v.tobytes()) for k, v in tensors}
            elif name.endswith(".json"):
                out[name] = json.loads(p.read_text())
            else:
                out[name] = p.read_bytes()
        except Exception:  # a torn file: equal to nothing a complete checkpoint holds
            out[name] = ("unreadable", p.read_bytes())
    return out


def metric_rows(d: Path) -> dict[tuple[int, bool], dict]:
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], "ce" in r): r for r in rows}


# ----------------------------------------------------------------------------- driver
def _arm(n: int) -> None:
    """SIGKILL this process at its n-th file-system call (a file write: before and half-way)."""
    import mlx.core as mx

    count = [0]

    def tick() -> bool:
        count[0] += 1
        return count[0] == n

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap(mod, name):
        real = getattr(mod, name)

        def call(*a, **k):
            if tick():
                die()
            return real(*a, **k)

        setattr(mod, name, call)

    for name in ("replace", "rename", "symlink", "unlink", "link", "mkdir", "rmdir"):
        wrap(os, name)
    wrap(shutil, "rmtree")

    def writer(real, path_of):
        def call(*a, **k):
            if tick():  # before the file
                die()
            out = real(*a, **k)
            if tick():  # half-way through it: the first half on disk, then death
                p = path_of(a)
                os.truncate(p, os.path.getsize(p) // 2)
                die()
            return out

        return call

    mx.save_safetensors = writer(mx.save_safetensors, lambda a: a[0])
    Path.write_text = writer(Path.write_text, lambda a: a[0])


def _in_child(fn) -> int:
    """Run fn() in a forked child; its wait status. This process itself never runs MLX (its
    threads would not survive a fork), so every child starts clean."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def _train_recording(work: Path, w: Path) -> None:
    """The run itself: at each save, keep the directory as it was (pre-STEP) and the new
    checkpoint on its own (stage-STEP), then save as usual."""
    from mlx_model import train, trainer

    real_save = trainer.save_checkpoint

    def save(out, model, tok, opt, state, keep=1):
        shutil.copytree(out, work / f"pre-{state['step']}", symlinks=True)
        real_save(work / f"stage-{state['step']}", model, tok, opt, state, keep)
        return real_save(out, model, tok, opt, state, keep)

    trainer.save_checkpoint = save
    train.main(["--resume", str(w), "--out", str(w), *RUN, "--keep", "1"])


def _save_killed(d: Path, stage: Path, n: int) -> None:
    """The writer: save stage's checkpoint into d (as the trainer does), dying at call n."""
    from mlx_model.checkpoint import load_model, read_safetensors
    from mlx_model.data import Tokenizer
    from mlx_model.train_state import save_checkpoint

    model, tok = load_model(stage), Tokenizer.load(str(stage))
    opt = read_safetensors(stage / "optimizer.safetensors")
    state = json.loads((stage / "trainer_state.json").read_text())
    _arm(n)
    save_checkpoint(d, model, tok, opt, state, keep=1)


def _resume(argv: list[str]) -> None:
    from mlx_model import train

    train.main(argv)


def drive(work: Path, base: Path, ref: Path) -> None:
    """Resume `base` (plain files of step BASE) to the end; kill its saves (steps KILLED) at
    every point; resume each killed directory to the end. Writes work/report.json."""
    w = work / "w"
    shutil.copytree(base, w)
    assert _in_child(lambda: _train_recording(work, w)) == 0, "the recorded run failed"
    killed: list[dict] = []
    for step in KILLED:
        stage = work / f"stage-{step}"
        old, new = snapshot(work / f"pre-{step}"), snapshot(stage)
        for n in range(1, 1000):
            d = work / f"kill-step{step}-{n:03d}"
            shutil.copytree(work / f"pre-{step}", d, symlinks=True)
            status = _in_child(lambda d=d, n=n, s=stage: _save_killed(d, s, n))
            if os.WIFEXITED(status):  # n is past the last call: the save completed
                assert os.WEXITSTATUS(status) == 0, f"the writer failed at call {n}"
                assert snapshot(d) == new, "an uninterrupted save differs from the trainer's"
                shutil.rmtree(d)
                break
            assert os.WTERMSIG(status) == signal.SIGKILL, status
            left = snapshot(d)
            left_as = "old" if left == old else "new" if left == new else "MIX"
            killed.append({"dir": str(d), "step": step, "n": n, "left": left_as})

    want, want_rows = snapshot(ref), metric_rows(ref)
    for k in killed:  # --resume from what the kill left, to the end
        d = Path(k["dir"])
        if k["left"] == "MIX":  # the test fails on this already
            continue
        k["resumed_from"] = json.loads((d / "trainer_state.json").read_text())["step"]
        argv = ["--resume", str(d), "--out", str(d), "--progress", "false", "--keep", "1"]
        k["resume_status"] = _in_child(lambda argv=argv: _resume(argv))
        got, rows = snapshot(d), metric_rows(d)
        k["same_weights"] = got["model.safetensors"] == want["model.safetensors"]
        k["same_optimizer"] = got["optimizer.safetensors"] == want["optimizer.safetensors"]
        k["bad_metrics"] = [
            f"step {s} {m}"
            for (s, is_train), r in want_rows.items()
            if s > k["resumed_from"]
            for m in METRICS
            if m in r and rows.get((s, is_train), {}).get(m) != r[m]
        ]
        k["step_after"] = json.loads((d / "trainer_state.json").read_text())["step"]
        k["tmp_left"] = sorted(p.name for p in (d / "checkpoints").glob(".tmp-*"))
        k["step_dirs"] = sorted(p.name for p in (d / "checkpoints").glob("step-*"))
        shutil.rmtree(d)
    (work / "report.json").write_text(json.dumps(killed, indent=1))


# ------------------------------------------------------------------------------ tests
def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_model.train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> tuple[Path, Path, Path]:
    """An uninterrupted run keeping every checkpoint; also its root and its step-BASE dir."""
    root = tmp_path_factory.mktemp("atomic")
    rng = np.random.default_rng(11)
    words = ["".join(rng.choice(list("abcdefghij"), rng.integers(2, 7))) for _ in range(200)]
    (root / "a.txt").write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(1500)))
    data = ["--data", str(root / "a.txt"), "--cache-dir", str(root / "cache")]
    res = run_train(*RUN, *data, "--keep", "3", "--out", str(root / "ref"))
    assert res.returncode == 0, res.stderr[-3000:]
    steps = sorted(p.name for p in (root / "ref" / "checkpoints").glob("step-*"))
    assert steps == [f"step-{s:08d}" for s in range(1, LAST + 1)], steps
    return root, root / "ref", root / "ref" / "checkpoints" / f"step-{BASE:08d}"


def plain_base(root: Path, ref: Path, step_dir: Path) -> Path:
    """Plain files of a reference step (as an older version wrote them) + its metrics."""
    base = root / "base"
    if not base.exists():
        base.mkdir()
        for f in step_dir.iterdir():
            shutil.copy2(f, base / f.name)
        rows = (ref / "metrics.jsonl").read_text().splitlines()
        keep = [r for r in rows if json.loads(r)["step"] <= BASE]
        (base / "metrics.jsonl").write_text("".join(r + "\n" for r in keep))
    return base


def test_kill_at_every_point_of_a_save_then_resume(ref):
    root, ref_dir, step_dir = ref
    base = plain_base(root, ref_dir, step_dir)
    work = root / "kills"
    work.mkdir()
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from mlx_model import speedups; speedups.enable(); "  # as the CLIs (no MLX yet)
        "from tests.test_checkpoint_atomic import drive; from pathlib import Path; "
        "drive(*map(Path, sys.argv[2:]))"
    )
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(work), str(base), str(ref_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads((work / "report.json").read_text())
    by_step = {s: [k for k in report if k["step"] == s] for s in KILLED}
    # both saves were killed at many points, with both outcomes seen
    for s, ks in by_step.items():
        assert len(ks) >= 15, (s, len(ks))
        assert {k["left"] for k in ks} == {"old", "new"}, (s, {k["left"] for k in ks})
    for k in report:
        where = f"killed at call {k['n']} of the step-{k['step']} save"
        assert k["left"] in ("old", "new"), f"{where}: a mixed checkpoint was left"
        want_start = k["step"] - 1 if k["left"] == "old" else k["step"]
        assert k["resumed_from"] == want_start, (where, k["resumed_from"])
        assert k["same_weights"] and k["same_optimizer"], f"{where}: resume diverged"
        assert not k["bad_metrics"], f"{where}: metrics differ: {k['bad_metrics'][:5]}"
        assert k["resume_status"] == 0 and k["step_after"] == LAST, (where, k)
        if k["resumed_from"] < LAST:  # the resumed run saved: it tidied what the kill left
            assert k["tmp_left"] == [], (where, k["tmp_left"])
            assert k["step_dirs"] == [f"step-{LAST:08d}"], (where, k["step_dirs"])


def test_full_disk_while_saving_keeps_previous_checkpoint(ref, monkeypatch, capsys):
    """ENOSPC from the writer: one `error:` line, exit 2, the previous checkpoint untouched."""
    import mlx.core as mx

    from mlx_model import train

    root, ref_dir, step_dir = ref
    d = root / "full-disk"
    shutil.copytree(plain_base(root, ref_dir, step_dir), d)
    before = snapshot(d)
    assert before["trainer_state.json"]["step"] == BASE
    capsys.readouterr()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mx, "save_safetensors", full)
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(d), "--out", str(d), "--progress", "false"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    last = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert e.value.code == 2, err[-2000:]
    assert len(last) == 1 and "No space left on device" in last[0], err[-2000:]
    assert "Traceback" not in err
    assert snapshot(d) == before
    assert not list((d / "checkpoints").glob(".tmp-*"))
    from mlx_model.checkpoint import load_model

    load_model(d)  # still loads


def test_file_set_changes_between_checkpoints(tmp_path):
    """A name the previous checkpoint lacked (a first mtp.safetensors) appears with the new
    one and goes with the next one that lacks it; a transformers-style directory (shards +
    index) used as --out is adopted, and its shard names go once our checkpoint replaces it."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_model.checkpoint import load_model, save_model
    from mlx_model.data import train_tokenizer
    from mlx_model.model import Model
    from mlx_model.presets import preset
    from mlx_model.train_state import read_trainer_state, save_checkpoint

    tok = train_tokenizer(["some words to train a small byte-level tokenizer on " * 30], 300)
    plain, mtp = preset("tiny"), preset("tiny").replace(num_nextn_predict_layers=1)
    models = {}
    for name, args in (("plain", plain), ("mtp", mtp)):
        mx.random.seed(3)
        models[name] = Model(args)
        mx.eval(models[name].parameters())

    def save(name: str, step: int) -> None:
        opt = {"m": mx.array(np.random.default_rng(step).normal(size=4).astype(np.float32))}
        save_checkpoint(out, models[name], tok, opt, {"step": step}, keep=2)

    out = tmp_path / "out"
    save_model(out, models["plain"], tok)  # a plain directory, then shards as transformers has
    shutil.move(out / "model.safetensors", out / "model-00001-of-00001.safetensors")
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00001-of-00001.safetensors"}})
    )
    save("mtp", 1)
    assert (out / "mtp.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("model-0*")), "stale shard names left"
    assert load_model(out).args.num_nextn_predict_layers == 1
    save("plain", 2)
    assert not (out / "mtp.safetensors").exists() and not (out / "mtp.safetensors").is_symlink()
    loaded = load_model(out)
    assert loaded.args.num_nextn_predict_layers == 0 and read_trainer_state(out)["step"] == 2
    want = dict(tree_flatten(models["plain"].parameters()))
    for k, v in tree_flatten(loaded.parameters()):
        np.testing.assert_array_equal(np.array(v), np.array(want[k]), err_msg=k)
    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert steps == ["step-00000001", "step-00000002"], steps  # keep=2
    # the older step directory is a complete checkpoint of its own
    assert load_model(out / "checkpoints" / "step-00000001").args.num_nextn_predict_layers == 1


def test_killed_directory_writer_is_cleaned_up_by_the_next(tmp_path):
    """A writer SIGKILLed inside write_dir (e.g. a data-cache preparation) leaves its temporary
    sibling; the next write_dir on this host removes it, and leaves a live writer's and another
    host's temporary directories alone."""
    from mlx_model import checkpoint as ckpt

    out = tmp_path / "cache-abc"
    child = (
        "import sys, time, pathlib; from mlx_model import checkpoint as c\n"
        "def fill(t):\n"
        "    (t / 'part.bin').write_bytes(b'x' * 1000); print('filling', flush=True); time.sleep(60)\n"
        f"c.write_dir(pathlib.Path({str(out)!r}), fill, merge=False)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "filling"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    prefix = ckpt._tmp_prefix(out)
    left = [d.name for d in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(f"{prefix}{p.pid}.") and not out.exists()
    live = tmp_path / f"{prefix}{os.getpid()}.live"  # this process: alive
    other_host = tmp_path / f".tmp-{out.name}.some-other-host.{p.pid}.x"
    live.mkdir()
    other_host.mkdir()

    assert ckpt.write_dir(out, lambda t: (t / "done").write_text("ok"), merge=False)
    assert sorted(d.name for d in tmp_path.iterdir()) == sorted(
        [out.name, live.name, other_host.name]
    )
    assert (out / "done").read_text() == "ok"
