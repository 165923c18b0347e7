"""Memory-planned training: activation checkpointing, the chunked update, bfloat16 moments,
the memory plan against measured peaks, and --memory-budget / --plan on the CLI.

Fresh seeded inputs in every test; references are a second run without the option under test.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_model.budget import fit_budget
from mlx_model.memory import count_parameters, parse_bytes, plan_memory
from mlx_model.model import Model
from mlx_model.presets import preset
from mlx_model.train_config import TrainConfig, TrainError
from mlx_model.trainer import Trainer
from tools.plan_check import measure

ROOT = Path(__file__).resolve().parents[1]
PLAN_TOL = 0.20  # |plan - measured peak| / measured peak


def flat(tree) -> dict[str, np.ndarray]:
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(tree)}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_steps(cfg: TrainConfig, data: list[list[np.ndarray]], **model_kw) -> Trainer:
    args = preset("tiny").replace(**model_kw)
    mx.random.seed(0)
    model = Model(args)
    mx.eval(model.parameters())
    t = Trainer(cfg, args, model)
    for batches in data:
        t.step([mx.array(b) for b in batches])
    return t


def batches(seed: int, steps: int, accum: int, B: int, T: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        [rng.integers(0, 512, (B, T + 1)).astype(np.int32) for _ in range(accum)]
        for _ in range(steps)
    ]


@pytest.mark.parametrize("compiled,lanes,accum", [(True, 2, 2), (False, 1, 1), (True, 2, 1)])
def test_grad_checkpoint_gives_the_same_training(compiled, lanes, accum):
    """Checkpointing on/off: same parameters after 2 steps (so the same gradients), with MTP,
    capacity dropping, accumulation, lanes and compile."""
    data = batches(7, 2, accum, 4, 16)
    kw = dict(batch_size=4, seq_len=16, accum=accum, lr=1e-2, warmup=1, max_steps=2)
    kw.update(compile=compiled, lanes=lanes)
    model_kw = dict(num_nextn_predict_layers=1, capacity_factor=1.0, bias_update_speed=0.01)
    ref = flat(run_steps(TrainConfig(**kw), data, **model_kw).model.parameters())
    got = flat(
        run_steps(TrainConfig(grad_checkpoint=True, **kw), data, **model_kw).model.parameters()
    )
    for k in ref:
        err = rel_err(got[k], ref[k])
        assert err < 2e-6, f"{k}: rel err {err:.2e}"


@pytest.mark.parametrize("second_moment", ["full", "factored"])
def test_chunked_update_equals_compiled_update(second_moment):
    data = batches(3, 3, 2, 4, 16)
    kw = dict(batch_size=4, seq_len=16, accum=2, lr=1e-2, warmup=1, max_steps=3, lanes=1)
    kw.update(second_moment=second_moment)
    ref = run_steps(TrainConfig(**kw), data)
    got = run_steps(TrainConfig(update_chunk_mb=0.05, **kw), data)  # many chunks
    a, b = flat(ref.model.parameters()), flat(got.model.parameters())
    sa, sb = flat(ref.optimizer.state), flat(got.optimizer.state)
    for k in a:
        assert rel_err(b[k], a[k]) < 1e-6, k
    for k in sa:
        assert rel_err(sb[k], sa[k]) < 1e-6, k


def test_bfloat16_moments_halve_the_state_and_stay_close():
    data = batches(5, 3, 1, 4, 16)
    kw = dict(batch_size=4, seq_len=16, lr=1e-2, warmup=1, max_steps=3, lanes=1)
    ref = run_steps(TrainConfig(**kw), data)
    got = run_steps(TrainConfig(moments_dtype="bfloat16", **kw), data)
    moments = [v for k, v in tree_flatten(got.optimizer.state) if k.endswith((".m", ".v"))]
    assert moments and all(v.dtype == mx.bfloat16 for v in moments)
    ref_bytes = sum(
        v.nbytes for k, v in tree_flatten(ref.optimizer.state) if k.endswith((".m", ".v"))
    )
    assert sum(v.nbytes for v in moments) * 2 == ref_bytes
    a, b = flat(ref.model.parameters()), flat(got.model.parameters())
    errs = {k: rel_err(b[k], a[k]) for k in a}
    assert max(errs.values()) < 2e-2, max(errs.items(), key=lambda kv: kv[1])
    assert max(errs.values()) > 0  # the option does change the numbers (rounded moments)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("tiny", {}),
        ("small", dict(num_nextn_predict_layers=1, q_lora_rank=32)),
        ("seed", {}),
        ("mac8gb", dict(num_hidden_layers=2, vocab_size=1024)),
    ],
)
def test_parameter_count_matches_the_model(name, kw):
    args = preset(name).replace(**kw)
    model = Model(args)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert count_parameters(args) == (trainable, total - trainable)


PLAN_CASES = {
    "tiny": ("tiny", dict(lanes=1)),
    "small": ("small", dict(batch_size=4, lanes=1)),
    "seed": ("seed", dict(batch_size=2, accum=2, lanes=1)),
    "small-bfloat16": ("small", dict(batch_size=4, lanes=1, dtype="bfloat16")),
    "tiny-chunked-bf16-moments": (
        "tiny",
        dict(lanes=1, accum=2, update_chunk_mb=0.2, moments_dtype="bfloat16"),
    ),
    "small-factored-bf16-m": (
        "small",
        dict(batch_size=2, lanes=1, accum=2, moments_dtype="bfloat16", second_moment="factored"),
    ),
    # larger micro-batches: the activations outgrow the gradients and the update
    "small-B32": ("small", dict(batch_size=32, lanes=1)),
    "small-B16-T256": ("small", dict(batch_size=16, seq_len=256, lanes=1)),
}


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_plan_matches_measured_peak(case):
    name, kw = PLAN_CASES[case]
    r = measure(name, kw)  # tools.plan_check's measurement, in this process
    planned, measured = r["plan"], r["measured"]
    err = abs(planned - measured) / measured
    assert err <= PLAN_TOL, f"plan {planned / 1e6:.1f} MB vs measured {measured / 1e6:.1f} MB"


# One compiled training step of `small` in a fresh process, as `mlx_model.train` runs it:
# depth-first graph order with --grad-checkpoint, set before anything is evaluated (this test
# process has evaluated long ago, and MLX reads the order once). Prints JSON: the step's peak
# above the memory held before it (parameters, moments), the gradient bytes, and the plan.
PEAK_SCRIPT = """
import json, sys
from mlx_model import speedups
speedups.enable(quiet=True)
ckpt = sys.argv[1] == "1"
if ckpt:
    speedups.depth_first_order()
import mlx.core as mx, numpy as np
from mlx_model.presets import preset
from mlx_model.memory import count_parameters, plan_memory
from mlx_model.train import build_model
from mlx_model.train_config import TrainConfig, training_preset
from mlx_model.trainer import Trainer
from tools.plan_check import measure
args = preset("small")
kw = dict(batch_size=8, seq_len=128, accum=1, lanes=1, update_chunk_mb=4.0, progress=False)
cfg = TrainConfig(**{**training_preset("small"), **kw, "grad_checkpoint": ckpt})
trainer = Trainer(cfg, args, build_model(cfg, args))
rng = np.random.default_rng(int(sys.argv[2]))
data = [mx.array(rng.integers(0, args.vocab_size, (8, 129)).astype(np.int32))]
trainer.step(data)  # compiles
mx.eval(trainer.model.parameters(), trainer.optimizer.state)
before = mx.get_active_memory()
mx.reset_peak_memory()
trainer.step(data)
print(json.dumps(dict(
    peak=mx.get_peak_memory(), above=mx.get_peak_memory() - before,
    grads=count_parameters(args)[0] * 4, plan=plan_memory(args, cfg, 1).total)))
"""


def step_peak(ckpt: bool, seed: int) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, "1" if ckpt else "0", str(seed)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_grad_checkpoint_halves_activations_and_the_plan_holds():
    """--grad-checkpoint keeps at most 60% of the step's activation memory (measured on small,
    batch 8 x 128: ~30%), and the plan holds the checkpointed peak within PLAN_TOL. Activation
    memory = the step's peak above what it started with (parameters, moments), less one set of
    gradients."""
    off, on = step_peak(False, 21), step_peak(True, 21)
    act_off, act_on = off["above"] - off["grads"], on["above"] - on["grads"]
    assert act_on <= 0.6 * act_off, f"activations {act_on / 1e6:.1f} MB vs {act_off / 1e6:.1f}"
    err = abs(on["plan"] - on["peak"]) / on["peak"]
    assert err <= PLAN_TOL, f"plan {on['plan'] / 1e6:.1f} MB vs measured {on['peak'] / 1e6:.1f}"


def test_fit_budget_keeps_tokens_per_step_and_fits():
    args = preset("small")
    cfg = TrainConfig(batch_size=16, seq_len=128, accum=2)
    for budget in (2e9, 4e8, 2.5e8):
        got, plan = fit_budget(args, cfg, int(budget), lanes=2)
        assert got.batch_size * got.accum == 32
        assert plan.total <= budget
        assert plan.total == plan_memory(args, got, got.lanes).total
    with pytest.raises(TrainError, match="largest term"):
        fit_budget(args, cfg, 10_000_000)


def test_parse_bytes():
    assert parse_bytes("5GB") == 5_000_000_000
    assert parse_bytes("800 MB") == 800_000_000
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30)
    with pytest.raises(TrainError):
        parse_bytes("lots")


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_model.train", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_cli_plan_and_budget():
    r = cli("--preset", "small", "--memory-budget", "1GB", "--plan", "true")
    assert r.returncode == 0, r.stderr
    assert "memory budget 1.00 GB: chose batch" in r.stderr
    assert "total" in r.stdout and "[B,T,vocab]" in r.stdout
    r = cli("--preset", "small", "--memory-budget", "10MB")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: nothing fits"), r.stderr


@pytest.mark.parametrize("compiled", [True, False])
def test_leafwise_accumulation_equals_one_add_and_saves_a_gradient_set(compiled, monkeypatch):
    """One lane: micro-steps after the first add their gradients a group at a time
    (Trainer._add_leafwise); parameters bit-identical to the one compiled add per micro-step
    (MTP and capacity dropping on, so the tree holds lists), and the peak of the micro-steps
    is about one gradient set lower (vocabulary-heavy tiny: gradients dominate)."""
    monkeypatch.setattr("mlx_model.trainer.ADD_CHUNK_BYTES", 200_000)  # groups in a tiny model
    model_kw = dict(num_nextn_predict_layers=1, capacity_factor=1.0, vocab_size=8192)
    data = batches(13, 2, 3, 1, 16)
    kw = dict(batch_size=1, seq_len=16, accum=3, lr=1e-2, warmup=1, max_steps=2, lanes=1)
    kw.update(compile=compiled)
    trainers, peaks = {}, {}
    for leaf in (False, True):
        args = preset("tiny").replace(**model_kw)
        mx.random.seed(0)
        model = Model(args)
        mx.eval(model.parameters())
        t = Trainer(TrainConfig(**kw), args, model)
        assert t.leafwise
        t.leafwise = leaf
        for step in data:
            gc.collect()
            step = [mx.array(b) for b in step]
            mx.eval(step)
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            t._gradients(step)
            peaks[leaf] = mx.get_peak_memory() - base
            t.step(step)
        trainers[leaf] = t
    a, b = flat(trainers[False].model.parameters()), flat(trainers[True].model.parameters())
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    grads = sum(v.nbytes for _, v in tree_flatten(trainers[True].model.trainable_parameters()))
    saved = peaks[False] - peaks[True]
    assert saved > 0.7 * grads, f"saved {saved / 1e6:.2f} MB of a {grads / 1e6:.2f} MB gradient set"
