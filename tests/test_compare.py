"""tools.compare: two tiny configurations trained end to end on the built-in corpus, the table's
numbers checked against the runs' own metrics, resuming without retraining, bad input; and the
interpolation / balance helpers against hand-computed values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.compare import balanced_at, interp, summarise

ROOT = Path(__file__).resolve().parents[1]
RUNS = ["--run", "moe: --preset tiny", "--run", "dense: --preset tiny --first-k-dense-replace 2"]


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.compare", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[Path, list[str], subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("cmp")
    common = ["--out", str(root / "out"), "--steps", "6", "--eval-every", "3"]
    common += ["--cache-dir", str(root / "cache"), "--jobs", "2"]
    return root / "out", common, compare(*common, *RUNS)


def test_two_configs_end_to_end(compared):
    out, _, r = compared
    assert r.returncode == 0, r.stderr[-2000:]
    assert "same tokenizer and token stream in every run: yes" in r.stdout
    assert (out / "compare.png").stat().st_size > 1000
    res = json.loads((out / "compare.json").read_text())
    rows, runs = res["summary"]["rows"], res["runs"]
    assert set(rows) == {"moe", "dense"}
    for name, row in rows.items():
        metrics = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        val = [m["val_ce"] for m in metrics if "val_ce" in m]
        assert [m["step"] for m in metrics if "ce" in m] == list(range(1, 7))
        assert runs[name]["val_ce"] == val and len(val) == 2
        assert row["val_at_tokens"] == pytest.approx(val[-1])  # both ran 6 steps
        assert row["tokens_per_s"] > 0 and row["steps"] == 6
        assert f"{name} " in r.stdout
    assert rows["dense"]["active_params"] == rows["dense"]["params"]  # no routed experts
    # tiny: 1 MoE layer of 4 experts [32 x 64] x 3, top-2: half of them idle per token
    assert rows["moe"]["params"] - rows["moe"]["active_params"] == 2 * 3 * 32 * 64
    assert rows["moe"]["load_end"] >= 1.0 and rows["dense"]["load_end"] is None
    # the shortest run's own time: its final validation CE is its equal-time value
    fast = min(rows, key=lambda n: rows[n]["seconds"])
    assert rows[fast]["val_at_seconds"] == pytest.approx(runs[fast]["val_ce"][-1])


def test_finished_runs_are_not_retrained(compared):
    out, common, first = compared
    assert first.returncode == 0
    before = (out / "moe" / "metrics.jsonl").stat().st_mtime_ns
    r = compare(*common, *RUNS)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "moe: done (step 6), not retrained" in r.stderr
    assert (out / "moe" / "metrics.jsonl").stat().st_mtime_ns == before


def test_bad_inputs_exit_2(compared, tmp_path):
    out, common, _ = compared
    changed = compare(*common, "--run", "moe: --preset tiny --lr 1e-4")
    assert changed.returncode == 2 and changed.stderr.startswith("error: run 'moe'")
    for runs in (["--run", "no colon here"], ["--run", "a: --x", "--run", "a: --y"]):
        r = compare("--out", str(tmp_path), "--steps", "2", *runs)
        assert r.returncode == 2 and r.stderr.startswith("error: ")
        assert "Traceback" not in r.stderr


def test_interp_and_balanced_at():
    assert interp([0.0, 10.0], [4.0, 2.0], 2.5) == pytest.approx(3.5)
    assert interp([10.0, 20.0], [3.0, 2.0], 5.0) is None  # before the first evaluation
    assert interp([10.0, 20.0], [3.0, 2.0], 20.0) == pytest.approx(2.0)
    worst = [3.0] * 10 + [1.2] * 10
    # trailing 10-step means: (3*k + 1.2*(10-k)) / 10 <= 1.3 first when k = 0, at step 20
    assert balanced_at(worst, 1.3) == 20
    assert balanced_at(worst, 1.48) == 19  # k = 1: 1.38
    assert balanced_at([2.0] * 30, 1.3) is None


def test_summarise_equal_tokens_and_time():
    def run(tokens, seconds, val, worst=()):
        return dict(
            tokens=tokens[-1],
            seconds=seconds[-1],
            tokens_per_s=tokens[-1] / seconds[-1],
            params=10,
            active_params=5,
            eval_tokens=tokens,
            eval_seconds=seconds,
            val_ce=val,
            worst_load=list(worst),
            dropped=[],
            steps=len(tokens),
        )

    s = summarise(
        {
            "slow": run([100, 200], [10.0, 20.0], [3.0, 2.0], [2.0] * 10),
            "fast": run([100, 200, 300], [4.0, 8.0, 12.0], [3.5, 3.0, 2.5]),
        },
        1.3,
    )
    assert s["equal_tokens"] == 200 and s["equal_seconds"] == 12.0
    rows = s["rows"]
    assert rows["slow"]["val_at_tokens"] == 2.0 and rows["fast"]["val_at_tokens"] == 3.0
    assert rows["slow"]["val_at_seconds"] == pytest.approx(2.8)  # 3 - (12 - 10) / 10
    assert rows["fast"]["val_at_seconds"] == 2.5
    assert rows["slow"]["load_end"] == 2.0 and rows["slow"]["balanced_at"] is None
