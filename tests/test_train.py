"""Training loop: accumulation, bias balancing, CE, resume, atomic checkpoints, bad input.

Fresh seeded inputs in every test; references are NumPy float64 or a second run of the loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_model import checkpoint as ckpt
from mlx_model.config import BIAS_UPDATE_RULES
from mlx_model.loss import bias_delta, cross_entropy, loss_terms, moe_layers, update_bias
from mlx_model.model import Model
from mlx_model.presets import preset
from mlx_model.train_config import TrainConfig
from mlx_model.trainer import Trainer, lane_units

ROOT = Path(__file__).resolve().parents[1]


def flat(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_trainer(cfg: TrainConfig, seed: int = 0, **model_kw) -> Trainer:
    args = preset("tiny").replace(**model_kw)
    mx.random.seed(seed)
    model = Model(args)
    mx.eval(model.parameters())
    return Trainer(cfg, args, model)


@pytest.mark.parametrize("compiled", [True, False])
def test_accumulation_equals_large_batch(compiled):
    rng = np.random.default_rng(1)
    steps, B, T = 3, 4, 16
    data = [rng.integers(0, 512, (2 * B, T + 1)).astype(np.int32) for _ in range(steps)]
    big = make_trainer(
        TrainConfig(
            batch_size=2 * B,
            seq_len=T,
            accum=1,
            max_steps=steps,
            lr=1e-2,
            warmup=1,
            compile=compiled,
        ),
        bias_update_speed=0.01,
        num_nextn_predict_layers=1,
    )
    small = make_trainer(
        TrainConfig(
            batch_size=B, seq_len=T, accum=2, max_steps=steps, lr=1e-2, warmup=1, compile=compiled
        ),
        bias_update_speed=0.01,
        num_nextn_predict_layers=1,
    )
    for d in data:
        mb = big.step([mx.array(d)])
        ms = small.step([mx.array(d[:B]), mx.array(d[B:])])
        assert abs(mb["ce"] - ms["ce"]) < 1e-5, (mb["ce"], ms["ce"])
    a, b = flat(big.model), flat(small.model)
    assert a.keys() == b.keys()
    bias = [k for k in a if k.endswith("e_score_correction_bias")]
    assert bias and any(np.abs(a[k]).max() > 0 for k in bias), "bias never moved"
    for k in a:
        err = rel_err(b[k], a[k])
        assert err < 2e-5, f"{k}: rel err {err:.2e}, max abs {np.abs(a[k] - b[k]).max():.2e}"


def test_compiled_equals_uncompiled():
    rng = np.random.default_rng(2)
    batch = mx.array(rng.integers(0, 512, (4, 17)).astype(np.int32))
    runs = []
    for compiled in (True, False):
        t = make_trainer(
            TrainConfig(batch_size=4, seq_len=16, max_steps=2, lr=1e-2, warmup=1, compile=compiled)
        )
        for _ in range(2):
            t.step([batch])
        runs.append(flat(t.model))
    for k in runs[0]:
        assert rel_err(runs[1][k], runs[0][k]) < 1e-5, k


@pytest.mark.parametrize("batch_size,accum", [(2, 4), (4, 1), (4, 3)])
def test_lanes_equal_one_lane(batch_size, accum):
    """Two CPU lanes (micro-batches dealt out when accum is even, rows split otherwise) give the
    one-lane step: same metrics, same parameters after 3 steps, up to float32 summation order."""
    rng = np.random.default_rng(4)
    T = 16
    data = [
        [rng.integers(0, 512, (batch_size, T + 1)).astype(np.int32) for _ in range(accum)]
        for _ in range(3)
    ]
    runs = []
    for lanes in (1, 2):
        t = make_trainer(
            TrainConfig(
                batch_size=batch_size,
                seq_len=T,
                accum=accum,
                max_steps=3,
                lr=1e-3,
                warmup=1,
                lanes=lanes,
            ),
            bias_update_speed=0.01,
            num_nextn_predict_layers=1,
            capacity_factor=1.25,
        )
        assert t.lanes == lanes
        metrics = [t.step([mx.array(b) for b in step]) for step in data]
        runs.append((metrics, flat(t.model)))
    (m1, p1), (m2, p2) = runs
    for a, b in zip(m1, m2):
        for key in ("loss", "ce", "balance", "mtp", "grad_norm", "dropped_fraction"):
            assert abs(a[key] - b[key]) <= 2e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
        assert a["expert_load"] == b["expert_load"]
    for k in p1:
        err = rel_err(p2[k], p1[k])
        assert err < 2e-5, f"{k}: rel err {err:.2e}"


def test_lane_units_cover_every_row_once():
    batches = [np.arange(8 * m, 8 * m + 8)[:, None] for m in range(3)]
    for lanes, expect_units in ((1, 3), (2, 6), (4, 12)):  # accum 3: rows are split
        work = lane_units(batches, lanes)
        assert len(work) == lanes and len({len(w) for w in work}) == 1
        rows = sorted(int(r) for w in work for u in w for r in u[:, 0])
        assert rows == list(range(24)) and sum(len(w) for w in work) == expect_units
    work = lane_units(batches + [batches[0] + 24], 2)  # accum 4: whole micro-batches dealt out
    assert [[int(u[0, 0]) for u in w] for w in work] == [[0, 16], [8, 24]]


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 7, 50)).astype(np.float32) * 3
    targets = rng.integers(0, 50, (3, 7))
    x = logits.astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ref = -np.take_along_axis(logp, targets[..., None], -1).mean()
    got = cross_entropy(mx.array(logits), mx.array(targets)).item()
    assert abs(got - ref) / ref < 1e-6, (got, ref)


def test_loss_terms_are_consistent_and_ce_nonnegative():
    args = preset("tiny").replace(
        num_nextn_predict_layers=2, balance_loss_alpha=0.1, mtp_loss_weight=0.5
    )
    mx.random.seed(4)
    model = Model(args)
    ids = mx.array(np.random.default_rng(4).integers(0, 512, (2, 20)).astype(np.int32))
    t = loss_terms(model, ids[:, :-1], ids[:, 1:])
    assert t.ce.item() >= 0 and t.mtp.item() >= 0 and t.balance.item() >= 0
    expect = t.ce.item() + 0.1 * t.balance.item() + 0.5 * t.mtp.item()
    assert abs(t.total.item() - expect) < 1e-5
    # the counts cover every routed (token, slot) of the main MoE layer and both MTP blocks
    assert t.counts.shape == (3, 4)
    assert int(t.counts[0].sum().item()) == 2 * 19 * 2


@pytest.mark.parametrize("rule", BIAS_UPDATE_RULES)
def test_bias_update_moves_load_toward_balance(rule):
    """A router skewed toward expert 0: each bias rule alone must even out the load."""
    args = preset("tiny").replace(bias_update_speed=0.01, bias_update_rule=rule)
    mx.random.seed(5)
    model = Model(args)
    moe = moe_layers(model)[0]
    assert len(moe_layers(model)) == 1
    rng = np.random.default_rng(5)
    v = rng.normal(size=args.hidden_size).astype(np.float32)
    x = mx.array(rng.normal(size=(8, 32, args.hidden_size)).astype(np.float32) + v)
    w = np.array(moe.gate.weight)
    w[0] += 0.5 * v / np.linalg.norm(v)  # every token leans toward expert 0
    moe.gate.weight = mx.array(w)

    def counts() -> mx.array:
        return moe.route(x)[1].counts

    def load() -> float:
        c = np.array(counts(), dtype=np.float64)
        return float(c.max() / c.mean())

    before = load()
    assert before > 1.5, f"router not skewed enough to test ({before:.2f})"
    for _ in range(100):
        update_bias(model, counts()[None])
    after = load()
    assert after < before - 0.3, f"max/mean load {before:.2f} -> {after:.2f}"


@pytest.mark.parametrize("rule", BIAS_UPDATE_RULES)
def test_bias_delta_matches_numpy(seed, rule):
    """bias_delta vs float64 NumPy on random counts, an empty expert and an even load."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 50, (3, 8))
    counts[1, 2] = 0
    counts[2] = 7  # even load: neither rule moves anything
    got = np.array(bias_delta(mx.array(counts), 0.01, rule), dtype=np.float64)
    c = counts.astype(np.float64)
    mean = c.mean(-1, keepdims=True)
    want = 0.01 * (np.sign(mean - c) if rule == "sign" else (mean - c) / mean)
    assert np.abs(got - want).max() < 1e-8, f"{rule}: max diff {np.abs(got - want).max()}"
    assert not got[2].any()
    if rule == "relative":  # the move grows with the load error; sign moves everyone by gamma
        err = np.abs(c[0] - mean[0])
        assert np.argmax(np.abs(got[0])) == np.argmax(err)


def test_crash_during_checkpoint_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    from mlx_model.data import train_tokenizer

    tok = train_tokenizer(["hello world, some text to train a byte-level tokenizer " * 20], 300)
    t = make_trainer(TrainConfig(batch_size=2, seq_len=8, max_steps=2, warmup=1))
    out = tmp_path / "ck"
    t.save(out, tok, 1)
    before = flat(ckpt.load_model(out))
    t.step([mx.array(np.random.default_rng(6).integers(0, 512, (2, 9)).astype(np.int32))])

    real = mx.save_safetensors

    def crash(path, arrays, metadata=None):
        real(path, dict(list(arrays.items())[:2]))  # half a file, then the process "dies"
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(mx, "save_safetensors", crash)
    with pytest.raises(ckpt.CheckpointError, match="simulated crash while writing"):
        t.save(out, tok, 2)
    monkeypatch.undo()
    after = flat(ckpt.load_model(out))
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 1
    assert not list(out.glob(".tmp-*")), "temporary files left behind"
    assert not list((out / "checkpoints").glob(".tmp-*")), "temporary files left behind"
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


# ------------------------------------------------------------------- through the CLI
def run_train(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_model.train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A few hundred KB of seeded random 'words', enough for tiny runs."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(7)
    words = [
        "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 8)))
        for _ in range(300)
    ]
    text = "\n".join(" ".join(rng.choice(words, 12)) + "." for _ in range(4000))
    (d / "a.txt").write_text(text)
    return d / "a.txt"


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


COMMON = [
    "--preset",
    "tiny",
    "--log-every",
    "1",
    "--eval-every",
    "4",
    "--progress",
    "false",
    "--max-steps",
    "12",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus) -> Path:
    """One uninterrupted 12-step tiny run, shared by the tests below."""
    root = tmp_path_factory.mktemp("run")
    full = run_train(
        *COMMON,
        "--data",
        str(corpus),
        "--cache-dir",
        str(root / "cache"),
        "--out",
        str(root / "full"),
    )
    assert full.returncode == 0, full.stderr[-2000:]
    return root / "full"


def test_tiny_run_writes_checkpoint_and_sane_metrics(tiny_run):
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "optimizer.safetensors",
        "trainer_state.json",
        "metrics.jsonl",
    ):
        assert (tiny_run / name).is_file(), name
    rows = metrics(tiny_run)
    train_rows = [r for r in rows if "ce" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    for r in train_rows:
        assert (
            r["ce"] >= 0 and r["loss"] >= r["ce"] - 1e-6 and r["tokens_per_s"] > 0 and r["lr"] > 0
        )
        assert abs(r["ppl"] - np.exp(r["ce"])) < 1e-6 * r["ppl"]
        assert r["expert_load_max_over_mean"] >= 1.0
    val = [r["val_ce"] for r in rows if "val_ce" in r]
    assert len(val) == 3 and val[-1] < val[0], val


def test_resume_equals_uninterrupted(tmp_path, corpus, tiny_run):
    part = run_train(
        *COMMON,
        "--data",
        str(corpus),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--stop-at",
        "6",
        "--out",
        str(tmp_path / "part"),
    )
    assert part.returncode == 0, part.stderr[-2000:]
    assert json.loads((tmp_path / "part" / "trainer_state.json").read_text())["step"] == 6
    res = run_train("--resume", str(tmp_path / "part"), "--progress", "false")
    assert res.returncode == 0, res.stderr[-2000:]
    a = {(r["step"], "ce" in r): r for r in metrics(tiny_run)}
    b = {(r["step"], "ce" in r): r for r in metrics(tmp_path / "part")}
    assert a.keys() == b.keys()
    for key in a:
        for m in ("ce", "loss", "val_ce", "lr", "grad_norm"):
            if m in a[key]:
                assert a[key][m] == b[key][m], f"step {key[0]} {m}: {a[key][m]} vs {b[key][m]}"


def test_evaluate_cli_matches_library(tiny_run, corpus, tmp_path):
    from mlx_model.data import Tokenizer
    from mlx_model.evaluate import evaluate

    text = tmp_path / "eval.txt"
    text.write_text(corpus.read_text()[:8000])
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_model.evaluate",
            "--model",
            str(tiny_run),
            "--data",
            str(text),
            "--seq-len",
            "32",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    ce_cli = float(r.stdout.split()[1])
    tok = Tokenizer.load(str(tiny_run))
    ids = np.array(tok.encode(text.read_text()) + [tok.eos_id], dtype=np.int32)
    ref = evaluate(ckpt.load_model(tiny_run), ids, 32)
    assert abs(ce_cli - ref["ce"]) < 1e-3 and ref["ce"] > 0
    bad(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mlx_model.evaluate",
                "--model",
                str(corpus.parent),
                "--data",
                str(corpus),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        ),
        "config.json",
    )


def test_evaluate_memory_does_not_grow_with_the_text(tiny_run):
    """Scoring 40 batches peaks like scoring 2: one batch's activations live at a time."""
    import mlx.core as mx

    from mlx_model.evaluate import evaluate

    model = ckpt.load_model(tiny_run)
    ids = np.random.default_rng(0).integers(0, model.args.vocab_size, 40 * 8 * 32 + 1)
    peaks = []
    for n in (2, 40):
        mx.reset_peak_memory()
        evaluate(model, ids[: n * 8 * 32 + 1].astype(np.int32), 32, batch_size=8)
        peaks.append(mx.get_peak_memory())
    assert peaks[1] < 1.3 * peaks[0], peaks


def test_plot_writes_pngs(tiny_run, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "tools.plot", str(tiny_run), "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("loss.png", "lr.png", "expert_load.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def bad(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-1500:])
    err = result.stderr.strip().splitlines()
    assert err and err[-1].startswith("error: "), result.stderr[-1500:]
    assert "Traceback" not in result.stderr
    for w in words:
        assert w in err[-1], (w, err[-1])


def test_bad_inputs_exit_2(tmp_path, corpus):
    out = [
        "--out",
        str(tmp_path / "o"),
        "--preset",
        "tiny",
        "--cache-dir",
        str(tmp_path / "c"),
        "--progress",
        "false",
        "--max-steps",
        "2",
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    bad(run_train(*out, "--data", str(tmp_path / "missing.txt")), "missing.txt")
    bad(run_train(*out, "--data", str(empty)), "empty.txt")
    bad(run_train(*out, "--data", str(binary)), "blob.txt")
    bad(run_train(*out, "--data", str(short), "--vocab-size", "300"), "--seq-len")
    bad(run_train(*out, "--data", str(corpus), "--num-experts-per-tok", "9"), "num_experts_per_tok")
    bad(run_train(*out, "--data", str(corpus), "--hidden-size", "0"), "hidden_size")
    bad(run_train(*out, "--data", str(corpus), "--batch-size", "0"), "--batch-size")
    bad(run_train(*out, "--data", str(corpus), "--batch-size", "5", "--lanes", "2"), "--lanes")
    bad(run_train(*out, "--resume", str(tmp_path / "nope")), "nope")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad(run_train(*out[2:], "--data", str(corpus), "--out", str(blocker / "sub")), "--out")

    # a real checkpoint, then inputs that disagree with it; it must survive untouched
    good = tmp_path / "good"
    ok = run_train(
        "--preset",
        "tiny",
        "--data",
        str(corpus),
        "--cache-dir",
        str(tmp_path / "c"),
        "--progress",
        "false",
        "--max-steps",
        "2",
        "--out",
        str(good),
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    snapshot = {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()}
    bad(
        run_train(
            *out,
            "--data",
            str(corpus),
            "--tokenizer",
            str(good / "tokenizer.json"),
            "--vocab-size",
            "64",
        ),
        "vocab",
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    for name, data in snapshot.items():
        (broken / name).write_bytes(data[: len(data) // 2] if name == "model.safetensors" else data)
    bad(run_train(*out, "--data", str(corpus), "--init-from", str(broken)), "model.safetensors")
    assert {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()} == snapshot


def test_cli_flags_have_help_and_real_types():
    from mlx_model.train import build_parser, resolve

    p = build_parser()
    missing = [a.dest for a in p._actions if a.dest != "help" and not a.help]
    assert not missing, f"flags without --help text: {missing}"
    cfg, args = resolve(
        ["--preset", "tiny", "--compile", "false", "--lr", "2e-3", "--data", "a.txt", "b.txt"]
        + ["--q-lora-rank", "none", "--accum", "3", "--norm-topk-prob", "no"]
    )
    assert (cfg.compile, cfg.lr, cfg.data, cfg.accum) == (False, 2e-3, ["a.txt", "b.txt"], 3)
    assert args.q_lora_rank is None and args.norm_topk_prob is False
    assert cfg.batch_size == 8  # the tiny training preset
