"""The coordinator side of `python -m tools.bench`: one process per contender (`Proc`), asked for
one timed run at a time, round-robin (`interleave`), so that every contender sees the same load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

SETTLE_S = 0.3  # pause between runs of different workers (see interleave)


class Proc:
    def __init__(self, kind: str, name: str, ckpt: str, spec: dict):
        env = dict(os.environ)
        if name not in ("torch_reference", "peak") and spec.get("mlx_blas_threads"):
            n = str(spec["mlx_blas_threads"])
            env.update(MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n)
        cmd = [sys.executable, "-m", "tools.bench", "_worker", kind, name, ckpt, json.dumps(spec)]
        root = str(Path(__file__).resolve().parents[1])
        self.name = name
        self.p = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root, env=env
        )
        self.info = self._read()

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(
                f"bench worker {self.name} died (exit {self.p.wait()}); see its stderr above"
            )
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> dict:
        res = self.ask("quit")
        self.p.wait()
        return res


def interleave(procs: list[Proc], repeats: int) -> dict[str, list[dict]]:
    """Round-robin: every round asks every worker for one run, starting one later each round.

    A short pause before each run lets the previous worker's BLAS threads stop spinning
    (OpenMP keeps idle threads busy-waiting for up to ~200 ms), so they don't slow the next one.
    """
    res: dict[str, list[dict]] = {p.name: [] for p in procs}
    for r in range(repeats):
        for i in range(len(procs)):
            p = procs[(r + i) % len(procs)]
            time.sleep(SETTLE_S)
            res[p.name].append(p.ask("run"))
        print(f"  round {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return res
