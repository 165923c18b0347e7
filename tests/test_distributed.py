"""Data parallel training through `mlx.launch --backend ring` with 2 processes on localhost.

2 ranks with per-rank batch B equal 1 rank with batch 2B (parameters, balance bias, losses,
validation CE; relative L2 error <= 2e-5 per tensor, float32: all_sum adds in another order),
also across a resume; rank 1 writes nothing; a rank that dies or hangs ends the run with an
error line on rank 0 in bounded time and the last checkpoint still loads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_model import checkpoint as ckpt
from mlx_model.data import prepare_data
from mlx_model.distributed import Watchdog

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which(
    "mlx.launch"
)
pytestmark = pytest.mark.skipif(
    LAUNCH is None or not mx.distributed.is_available(),
    reason="mlx.launch or mx.distributed is not available",
)
TOL = 2e-5  # relative L2 error per tensor, float32 (as test_train's accumulation test: Adam amplifies reordered sums)
B = 4  # per-rank batch
COMMON = [
    "--preset",
    "tiny",
    "--compile",
    "true",
    "--seq-len",
    "32",
    "--accum",
    "2",
    "--lr",
    "1e-3",
    "--warmup",
    "1",
    "--bias-update-speed",
    "0.01",
    "--log-every",
    "1",
    "--eval-every",
    "3",
    "--save-every",
    "3",
    "--eval-batches",
    "3",
    "--progress",
    "true",
]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """A seeded text file and a token cache filled once, so runs never race to build it."""
    d = tmp_path_factory.mktemp("dp")
    rng = np.random.default_rng(3)
    words = [
        "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 8)))
        for _ in range(300)
    ]
    (d / "a.txt").write_text("\n".join(" ".join(rng.choice(words, 12)) + "." for _ in range(3000)))
    prepare_data([str(d / "a.txt")], None, 512, str(d / "cache"))  # tiny preset: vocab 512
    return d / "a.txt", d / "cache"


def free_ports() -> int:
    """A port P with P and P+1 free (mlx.launch's ring backend listens on P + rank)."""
    for _ in range(50):
        p = int(np.random.default_rng().integers(20000, 60000))
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def launch(run: Path, *args: str) -> subprocess.Popen:
    """2 ranks; rank r writes --out run/rank{r}, its pid to run/pid{r} and its output to run/log{r}."""
    run.mkdir(parents=True, exist_ok=True)
    script = (
        f'echo $$ > {run}/pid$MLX_RANK; exec "$0" -m mlx_model.train "$@" --out {run}/rank$MLX_RANK '
        f"> {run}/log$MLX_RANK 2>&1"
    )
    cmd = [
        LAUNCH,
        "-n",
        "2",
        "--backend",
        "ring",
        "-p",
        str(free_ports()),
        "--",
        "bash",
        "-c",
        script,
        sys.executable,
        *args,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def single(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlx_model.train", *args, "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(p: subprocess.Popen, run: Path | None = None, timeout: float = 900) -> str:
    out, _ = p.communicate(timeout=timeout)
    logs = "".join(
        f"\n--- rank {r}:\n" + (run / f"log{r}").read_text()[-3000:]
        for r in (0, 1)
        if run and (run / f"log{r}").is_file()
    )
    assert p.returncode == 0, out[-3000:] + logs
    return out


def weights(d: Path) -> dict[str, np.ndarray]:
    return ckpt.read_safetensors(d / "model.safetensors")


def metrics(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_equal_one_rank_with_double_batch_and_resume(tmp_path, data):
    text, cache = data
    src = ["--data", str(text), "--cache-dir", str(cache), *COMMON]
    cached = sorted(os.listdir(cache))
    t0 = time.perf_counter()
    # One after the other: with a cold MLX kernel cache (a fresh machine) concurrent runs would
    # all compile the same kernels on two cores at once.
    finish(single(tmp_path / "one", *src, "--batch-size", str(2 * B), "--max-steps", "6"))
    finish(
        launch(tmp_path / "a", *src, "--batch-size", str(B), "--max-steps", "6", "--stop-at", "3"),
        tmp_path / "a",
    )
    assert sorted(os.listdir(cache)) == cached, (
        "a run rebuilt the token cache"
    )  # (a resume keys it anew)
    first = tmp_path / "a" / "rank0"
    two = launch(tmp_path / "b", "--resume", str(first), "--cache-dir", str(cache))
    finish(two, tmp_path / "b")
    print(f"3 runs in {time.perf_counter() - t0:.1f} s")

    # Only rank 0 writes: checkpoint, metrics and the progress bar.
    for run in ("a", "b"):
        assert not (tmp_path / run / "rank1").exists(), "rank 1 wrote its --out directory"
        log0, log1 = (tmp_path / run / "log0").read_text(), (tmp_path / run / "log1").read_text()
        assert "config:" in log0 and "train:" in log0 and "world size 2" in log0
        assert not any(w in log1 for w in ("config:", "train:", "done:")), log1[-2000:]
    assert json.loads((first / "trainer_state.json").read_text())["step"] == 3

    # Same parameters, including the balance bias, after 3 + 3 steps (resumed) as one rank in 6.
    a, b = weights(tmp_path / "one"), weights(tmp_path / "b" / "rank0")
    assert a.keys() == b.keys()
    bias = [k for k in a if k.endswith("e_score_correction_bias")]
    assert bias and all(np.abs(a[k]).max() > 0 for k in bias), "the balance bias never moved"
    errs = {k: rel_err(b[k], a[k]) for k in a}
    worst = max(errs, key=errs.get)
    print(f"largest relative error {errs[worst]:.1e} ({worst})")
    assert errs[worst] <= TOL, (worst, errs[worst], float(np.abs(a[worst] - b[worst]).max()))
    for k in bias:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-7, err_msg=k)

    # Same reduced metrics: per-step loss (summed over ranks) and token-weighted validation CE
    # (3 validation batches of 2B rows; each rank evaluates B rows of each).
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "b" / "rank0")
    assert [r["step"] for r in m1] == [r["step"] for r in m2]
    for r1, r2 in zip(m1, m2):
        for key in ("loss", "ce", "val_ce", "expert_load_max_over_mean"):
            if key in r1:
                assert abs(r1[key] - r2[key]) <= 1e-5 * max(1.0, abs(r1[key])), (
                    r1["step"],
                    key,
                    r1[key],
                    r2[key],
                )
    assert [r["step"] for r in m2 if "val_ce" in r] == [3, 6]


def wait_for(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by the launcher's shell) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split()[2] == "Z")


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_dead_or_hung_rank_ends_run_with_message(tmp_path, data, fault):
    """Rank 1 is killed (SIGKILL) or stopped (SIGSTOP: alive but silent, which the ring backend
    waits on forever) after rank 0's first checkpoint. The launcher must return non-zero within a
    bounded time (reporting rank 0's exit status 2), rank 0 must say why, and the checkpoint must
    load. One validation batch for two ranks holding 4 windows: rank 0 evaluates all 4 (B = 4),
    rank 1 none but still joins the all_sum (no deadlock at evaluation). A new --val-fraction:
    rank 0 builds the token cache first."""
    text, cache = data
    run = tmp_path / "run"
    p = launch(
        run,
        "--data",
        str(text),
        "--cache-dir",
        str(cache),
        *COMMON,
        "--batch-size",
        str(B),
        "--max-steps",
        "100000",
        "--save-every",
        "1",
        "--eval-every",
        "1",
        "--eval-batches",
        "1",
        "--val-fraction",
        "0.0012",
        "--dist-timeout",
        "10",
    )
    try:
        state = run / "rank0" / "trainer_state.json"
        wait_for(lambda: state.is_file() or p.poll() is not None, 900, "rank 0's first checkpoint")
        assert p.poll() is None, p.communicate()[0][-3000:]
        pid0, pid1 = (int((run / f"pid{r}").read_text()) for r in (0, 1))
        t0 = time.monotonic()
        os.kill(pid1, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        wait_for(lambda: not alive(pid0), 60, "rank 0 to stop")
        took = time.monotonic() - t0
        if fault == "hang":
            os.kill(pid1, signal.SIGKILL)  # a stopped process ignores the launcher's SIGTERM
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    log0 = (run / "log0").read_text()
    # mlx.launch 0.32.4 itself exits 0 whatever its ranks do; it reports each failed rank instead.
    assert "Node with rank 0 exited with code 2" in out, out
    assert "error: rank 0:" in log0, log0[-3000:]
    if fault == "kill":
        assert "lost the connection to another rank" in log0 or "stopped by the launcher" in log0, (
            log0[-3000:]
        )
    else:
        assert "no progress from the other ranks for 10 s" in log0, log0[-3000:]
        assert took >= 9, took
    assert "last checkpoint: " + str(run / "rank0") + " (step " in log0, log0[-3000:]
    assert took < 60, took
    step = json.loads(state.read_text())["step"]
    assert step >= 1
    model = ckpt.load_model(run / "rank0")
    assert model.args.hidden_size == 64
    val = [r for r in metrics(run / "rank0") if "val_ce" in r]
    assert val and all(np.isfinite(r["val_ce"]) for r in val)


def test_rank_whose_peers_never_connect_stops(tmp_path, data):
    """Without mlx.launch: rank 0 of 2 waits for a peer that never starts (inside init, holding
    the GIL); --dist-timeout bounds it (a guard process prints the error and ends it)."""
    text, cache = data
    port = free_ports()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": "0"}
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_model.train",
            "--data",
            str(text),
            "--cache-dir",
            str(cache),
            "--preset",
            "tiny",
            "--dist-timeout",
            "3",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert time.monotonic() - t0 < 30
    assert "error: rank 0: no connection to the other ranks after 3 s" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_single_process_is_unchanged():
    """No launcher: a group of size 1, and the watchdog installs nothing."""
    if "MLX_HOSTFILE" in os.environ or "MLX_RANK" in os.environ:
        pytest.skip("running under a launcher")
    g = mx.distributed.init()
    assert (g.rank(), g.size()) == (0, 1)
    before = signal.getsignal(signal.SIGTERM)
    wd = Watchdog(0, 1, 0.01, Path("."), "none yet")
    time.sleep(0.05)
    wd.kick(1, saved=True)
    wd.close()
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.set_wakeup_fd(-1) == -1
