"""Data-parallel helpers for training under `mlx.launch` (MLX's own mx.distributed).

`init_group` joins the ranks (size 1 without a launcher) with a bounded wait; `Watchdog` ends a
rank with one error line when the others die or hang; `all_sum_or_fail` runs a collective outside
the step loop. Only the trainer uses them; with one process they do nothing.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import mlx.core as mx


class DistributedError(ValueError):
    """A rank could not connect or lost its peers; one line naming the problem and the fix."""


class Watchdog:
    """Data parallel: ends this rank with one `error: rank R: ...` line when the others stop.

    MLX's ring backend raises when a peer's socket closes (caught in the loop), but waits forever
    for a peer that hangs or whose machine vanished; mlx.launch stops the other ranks with SIGTERM
    when one exits with an error. A thread (MLX releases the GIL while it waits) fails the rank when
    `kick` was not called for `timeout` s or on SIGTERM, never while `lock` is held (a checkpoint
    is being written). Inert when world == 1.
    """

    FIRST_STEP_GRACE = 900.0

    def __init__(self, rank: int, world: int, timeout: float, out: Path, last_checkpoint: str):
        self.rank, self.timeout, self.out, self.last_checkpoint = (
            rank,
            timeout,
            out,
            last_checkpoint,
        )
        self.lock, self.active, self.beat = threading.Lock(), world > 1, time.monotonic()
        # The first step also compiles the step functions (on a CPU with a cold kernel cache,
        # minutes of g++): until it completes, allow at least FIRST_STEP_GRACE seconds. A peer
        # that dies meanwhile is still caught at once (its socket closes).
        self.limit = max(timeout, self.FIRST_STEP_GRACE)
        if not self.active:
            return
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        # Python's C-level handler writes the signal number to the wakeup fd at once, even while the
        # main thread waits inside MLX; the thread reads it there.
        self._old_term = signal.signal(signal.SIGTERM, lambda *a: None)
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        threading.Thread(target=self._run, daemon=True, name="dist-watchdog").start()

    def kick(self, step: int, saved: bool = False) -> None:
        """Record progress after `step` (and that its checkpoint was written)."""
        self.beat, self.limit = time.monotonic(), self.timeout
        if saved:
            self.last_checkpoint = f"{self.out} (step {step})"

    def fail(self, why: str) -> None:
        """Print the error line and end the process with status 2 (once, after any checkpoint write)."""
        with self.lock:
            print(
                f"\nerror: rank {self.rank}: {why}; last checkpoint: {self.last_checkpoint}",
                file=sys.stderr,
                flush=True,
            )
            os._exit(2)

    def close(self) -> None:
        if self.active:  # restore first: the thread closes the pipe once it sees active == False
            signal.set_wakeup_fd(self._old_fd)
            signal.signal(signal.SIGTERM, self._old_term)
            self.active = False

    def _run(self) -> None:
        term = False
        while self.active:
            if select.select([self._r], [], [], 1.0)[0]:
                term = term or signal.SIGTERM in os.read(self._r, 256)
            if not self.active:
                break
            if term:
                self.fail(
                    "stopped by the launcher (SIGTERM), usually because another rank died or failed (see the "
                    "launcher's [WARN] lines)"
                )
            if time.monotonic() - self.beat > self.limit:
                self.fail(
                    f"no progress from the other ranks for {self.limit:g} s (a rank died, hangs or "
                    "cannot connect; raise --dist-timeout if steps are that slow)"
                )
        os.close(self._r)
        os.close(self._w)


_INIT_GUARD = """import os, signal, sys, time
ppid, end = os.getppid(), time.monotonic() + float(sys.argv[1])
while os.getppid() == ppid and time.monotonic() < end:
    time.sleep(0.5)
if os.getppid() == ppid:
    print(sys.argv[2], file=sys.stderr, flush=True)
    os.kill(ppid, signal.SIGKILL)
"""


def init_group(timeout: float) -> Any:
    """mx.distributed.init() (size 1 without a launcher), ended with an error line after `timeout` s.

    A rank that waits for peers that never connect holds the GIL (no thread of ours runs), so under
    a launcher (MLX_RANK set) a small guard process prints the error and kills this one.
    """
    rank = os.environ.get("MLX_RANK")
    guard = None
    if rank is not None:
        why = (
            f"error: rank {rank}: no connection to the other ranks after {timeout:g} s (a rank died or cannot "
            "connect: check the hostfile's ips and the firewall)"
        )
        guard = subprocess.Popen(
            [sys.executable, "-c", _INIT_GUARD, str(timeout), why], stdin=subprocess.DEVNULL
        )
    try:
        return mx.distributed.init()
    except (
        RuntimeError
    ) as e:  # ring: a rank that cannot reach the next one gives up after about 30 s
        raise DistributedError(
            f"rank {rank or '?'}: cannot connect to the other ranks ({e}): check the hostfile's ips, "
            "the firewall, and that every host started"
        ) from None
    finally:
        if guard is not None:
            guard.kill()
            guard.wait()


def all_sum_or_fail(group: Any, x: mx.array, what: str) -> mx.array:
    """A collective outside the step loop; a lost peer becomes a TrainError naming `what`."""
    try:
        y = mx.distributed.all_sum(x, group=group)
        mx.eval(y)
        return y
    except RuntimeError as e:
        raise DistributedError(
            f"rank {group.rank()}: lost the connection to the other ranks {what} ({e}): "
            "a rank died or cannot connect"
        ) from None
