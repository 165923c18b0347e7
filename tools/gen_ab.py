"""Generate-bench rows A/B in ONE process: `python -m tools.gen_ab [--rows ...] [--repeats 5]`.

`python -m tools.bench generate` runs each row in its own worker process; on a shared, busy
machine those processes get different shares of the CPU from one run to the next. Here the
chosen rows (names as in tools/bench_generate.py `variants`) load side by side in this process
and take turns (round-robin, the starting row rotating each round), so every row sees the same
load. Prints each row's median decode tokens/s (wall) and its ratio to the first row, the spread
of that ratio over the rounds (each round's run against the first row's run of the same round:
lowest-highest), and the CPU-seconds ratio (process time per generated token, prefill
included). Uses the bench's trained fixtures (weights/, trained once by the bench) and mlx-lm's
quantized directories of them (written to a temporary folder). Set MKL_NUM_THREADS=1, as the
bench does.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlx_model import speedups

DEFAULT_ROWS = ["ours q4", "mlx_lm q4", "ours q8", "mlx_lm q8"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.gen_ab", description=__doc__.split("\n")[0])
    p.add_argument(
        "--rows",
        nargs="+",
        default=DEFAULT_ROWS,
        help="bench rows to compare, the first is the reference (default: q4/q8 ours vs mlx_lm)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row (interleaved)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens decoded per run")
    p.add_argument("--num-draft", type=int, default=1, help="N of the speculative rows")
    a = p.parse_args(argv)
    speedups.enable_for_cli()
    from mlx_model.data import Tokenizer
    from tools.bench_generate import (
        DRAFT,
        FIXTURE,
        GenWorker,
        ensure_distilled,
        ensure_fixture,
        variants,
    )
    from tools.spec_cost import bench_prompt

    fixture, draft = ensure_fixture(FIXTURE), ensure_fixture(DRAFT)
    prompt = bench_prompt(Tokenizer.load(str(fixture)), a.prompt_len)
    with tempfile.TemporaryDirectory(prefix="gen-ab-") as tmp:
        q = {bits: Path(tmp) / f"q{bits}" for bits in (8, 4)}
        rows = variants(fixture, draft, q, a.num_draft, ensure_distilled(fixture))
        unknown = [r for r in a.rows if r not in rows]
        if unknown:
            print(f"error: unknown rows {unknown}: choose from {list(rows)}", file=sys.stderr)
            raise SystemExit(2)
        for bits, path in q.items():
            if any(str(path) == rows[r]["dir"] for r in a.rows):
                cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(fixture)]
                cmd += ["--mlx-path", str(path), "-q", "--q-bits", str(bits)]
                subprocess.run(cmd + ["--q-group-size", "64"], check=True, capture_output=True)
        spec = {"prompt": prompt, "new_tokens": a.new_tokens}
        workers = {r: GenWorker(r, "", spec | rows[r]) for r in a.rows}
        for w in workers.values():  # warm-up: compile
            w.run()
        tps: dict[str, list[float]] = {r: [] for r in a.rows}
        cpu: dict[str, list[float]] = {r: [] for r in a.rows}
        for i in range(a.repeats):
            for r in a.rows[i % len(a.rows) :] + a.rows[: i % len(a.rows)]:
                c = time.process_time()
                tps[r].append(workers[r].run()["tokens_per_s"])
                cpu[r].append((time.process_time() - c) / a.new_tokens)
    ref = a.rows[0]
    t0, c0 = statistics.median(tps[ref]), statistics.median(cpu[ref])
    print(f"in-process A/B, {a.repeats} interleaved runs each, {a.new_tokens} tokens, greedy")
    for r in a.rows:
        t, c = statistics.median(tps[r]), statistics.median(cpu[r])
        per_round = [x / y for x, y in zip(tps[r], tps[ref])]
        other = rows[r].get("ref", "ours")  # the row decoding the same weights (the bench's)
        other = other if other in workers else ref
        same = workers[r].tokens == workers[other].tokens
        print(
            f"{r:22s} {t:7.1f} tokens/s {t / t0:5.2f}x (rounds {min(per_round):.2f}-"
            f"{max(per_round):.2f}x) | CPU {c * 1e3:6.2f} ms/token "
            f"{c0 / c:5.2f}x | same tokens as {other}: {same}"
        )


if __name__ == "__main__":
    main()
