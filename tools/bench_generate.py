"""`python -m tools.bench generate`: decoding side by side on a trained model.

    python -m tools.bench generate [--repeats 3] [--prompt-len 128] [--new-tokens 256]
                                   [--num-draft 1] [--json OUT]

Speculative acceptance depends on training, so this bench never uses random weights: it trains
(once, cached in weights/) the `small` preset with one MTP module for 300 steps on the built-in
corpus (FIXTURE), and a 2-layer, 128-wide draft model on the same tokenizer (DRAFT). mlx-lm's
`convert -q` writes 8- and 4-bit directories of FIXTURE; our q8/q4 rows load those very
directories, so both libraries decode the same quantized weights.

The MTP module of FIXTURE is also self-distilled (DISTILLED: mlx_model/mtp_distill.py, the
model's own greedy continuations of corpus windows, DISTILL_STEPS steps; same main weights).

Rows (each its own worker process, interleaved round-robin as in the train bench; medians):
ours plain / MTP-speculative (trained and distilled MTP) / draft-model speculative / q8 / q4 /
--quantize 4 plain and + MTP (mlx-lm's directories drop the MTP weights, so these rows quantize
the fixture on load), mlx-lm plain /
its draft-model speculative decoding / q8 / q4. Columns: decode tokens/s (prefill excluded),
acceptance (kept drafts / proposed drafts; mlx-lm does not report proposals, so for it the share
of tokens that came from the draft), weight bytes, peak memory (as in the train bench) and
whether the greedy tokens equal the reference (ours: our float plain decoding; a quantized
mlx-lm row: our row on the same directory). Validation CE (stdlib module docstrings, text the
fixture never saw) for float, q8 and q4.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = "weights/bench-gen-small-mtp1"
DRAFT = "weights/bench-gen-draft"
DISTILLED = "weights/bench-gen-small-mtp1-distill"  # FIXTURE, MTP module self-distilled
STEPS = "300"
DISTILL_STEPS = "150"
TRAIN = {
    FIXTURE: ["--preset", "small", "--num-nextn-predict-layers", "1"],
    DRAFT: [
        "--preset",
        "small",
        "--num-hidden-layers",
        "2",
        "--hidden-size",
        "128",
        "--intermediate-size",
        "384",
        "--moe-intermediate-size",
        "128",
        "--num-attention-heads",
        "2",
        "--num-key-value-heads",
        "2",
        "--kv-lora-rank",
        "32",
        "--tokenizer",
        f"{FIXTURE}/tokenizer.json",
    ],
}
HELD_OUT = ("argparse", "json", "collections", "dataclasses", "functools", "typing", "pathlib")


def ensure_fixture(out: str) -> Path:
    """Train the fixture unless a finished one (trainer_state at STEPS) is cached."""
    d = ROOT / out
    state = d / "trainer_state.json"
    if state.is_file() and json.loads(state.read_text()).get("step") == int(STEPS):
        return d
    cmd = [sys.executable, "-m", "mlx_model.train", *TRAIN[out], "--max-steps", STEPS]
    cmd += ["--out", str(d), "--progress", "false"]
    print(f"training the bench fixture {out} ({STEPS} steps) ...", file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return d


def ensure_distilled(fixture: Path) -> Path:
    """FIXTURE with its MTP module trained on the model's own greedy continuations of corpus
    windows (mlx_model/mtp_distill.py; never the bench's held-out prompt), cached."""
    d = ROOT / DISTILLED
    if (d / "trainer_state.json").is_file():  # written last
        return d
    cmd = [sys.executable, "-m", "mlx_model.mtp_distill", "--model", str(fixture)]
    cmd += ["--out", str(d), "--steps", DISTILL_STEPS]
    print(f"distilling the MTP module into {DISTILLED} ...", file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return d


def held_out_text() -> list[str]:
    import importlib

    return [importlib.import_module(m).__doc__ or "" for m in HELD_OUT]


def val_ce(model: Any, tok: Any) -> float:
    import numpy as np

    from mlx_model.evaluate import evaluate

    ids: list[int] = []
    for text in held_out_text():
        ids += tok.encode(text) + ([tok.eos_id] if tok.eos_id is not None else [])
    return evaluate(model, np.array(ids, np.int32), 128)["ce"]


def variants(
    fixture: Path, draft: Path, q: dict[int, Path], n: int, distilled: Path | None = None
) -> dict[str, dict]:
    """Row name -> what its worker loads and how it decodes."""
    f, d = str(fixture), str(draft)
    return {
        "ours": {"lib": "ours", "dir": f},
        f"ours mtp N={n}": {"lib": "ours", "dir": f, "mtp": n},
        f"ours mtp-distill N={n}": {"lib": "ours", "dir": str(distilled or f), "mtp": n},
        f"ours draft N={n}": {"lib": "ours", "dir": f, "draft": d, "n": n},
        "ours q8": {"lib": "ours", "dir": str(q[8]), "ref": "mlx_lm q8"},
        "ours q4": {"lib": "ours", "dir": str(q[4]), "ref": "mlx_lm q4"},
        "ours --quantize 4": {"lib": "ours", "dir": f, "quantize": 4, "ref": None},
        f"ours q4 mtp N={n}": {
            "lib": "ours",
            "dir": f,
            "quantize": 4,
            "mtp": n,
            "ref": "ours --quantize 4",
        },
        "mlx_lm": {"lib": "mlx_lm", "dir": f},
        f"mlx_lm draft N={n}": {"lib": "mlx_lm", "dir": f, "draft": d, "n": n},
        "mlx_lm q8": {"lib": "mlx_lm", "dir": str(q[8]), "ref": "ours q8"},
        "mlx_lm q4": {"lib": "mlx_lm", "dir": str(q[4]), "ref": "ours q4"},
    }


def bench_generate(a: Any) -> dict:
    from mlx_model.data import Tokenizer
    from mlx_model.generation import load
    from tools.bench_measure import median
    from tools.bench_procs import Proc, interleave

    fixture, draft = ensure_fixture(FIXTURE), ensure_fixture(DRAFT)
    distilled = ensure_distilled(fixture)
    tok = Tokenizer.load(str(fixture))
    text = " ".join(held_out_text())
    prompt = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text)
    prompt = prompt[: a.prompt_len]
    tmp = tempfile.TemporaryDirectory(prefix="bench-gen-")
    q = {bits: Path(tmp.name) / f"q{bits}" for bits in (8, 4)}
    for bits, path in q.items():  # mlx-lm's own quantization of the same checkpoint
        cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(fixture)]
        cmd += ["--mlx-path", str(path), "-q", "--q-bits", str(bits), "--q-group-size", "64"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = variants(fixture, draft, q, a.num_draft, distilled)
    # Batch-1 decoding multiplies a few rows at a time; one BLAS thread per process is faster
    # for both libraries here (a second thread only adds a hand-off per tiny matmul).
    threads = a.mlx_blas_threads or 1
    spec = {"warmup": a.warmup, "prompt": prompt, "new_tokens": a.new_tokens}
    spec["mlx_blas_threads"] = threads
    procs = []
    try:
        for name, v in rows.items():
            print(f"starting {name} ...", file=sys.stderr, flush=True)
            p = Proc("gen", "mlx_lm" if v["lib"] == "mlx_lm" else "mlx_model", ".", spec | v)
            p.name = name
            procs.append(p)
        runs = interleave(procs, a.repeats)
        finals = {p.name: p.close() for p in procs}
        ce = {"float": val_ce(load(str(fixture))[0], tok)}  # after the workers: see peak memory
        for bits, path in q.items():
            ce[f"q{bits}"] = val_ce(load(str(path))[0], tok)
    finally:
        for p in procs:
            if p.p.poll() is None:
                p.p.kill()
        tmp.cleanup()
    out: dict[str, Any] = {}
    for name, v in rows.items():
        r, ref = runs[name], v.get("ref", "ours")  # ref None: nothing decodes the same weights
        out[name] = {
            "tokens_per_s": median([x["tokens_per_s"] for x in r]),
            "acceptance": median([x.get("acceptance", 0.0) for x in r]) if "N=" in name else None,
            "weight_bytes": r[0]["weight_bytes"],
            "peak_memory_bytes": finals[name]["peak_memory_bytes"],
            "greedy_match": ref is not None and finals[name]["tokens"] == finals[ref]["tokens"],
            "reference": ref,
        }
    return {
        "generate": out,
        "val_ce": ce,
        "prompt_len": len(prompt),
        "new_tokens": a.new_tokens,
        "blas_threads": threads,
    }


def print_generate(res: dict) -> None:
    rows = res["generate"]
    print(
        f"generate: trained fixture {FIXTURE} (small + 1 MTP module, {STEPS} steps), batch 1, "
        f"prompt {res['prompt_len']}, {res['new_tokens']} new tokens, greedy; decode tokens/s "
        f"(prefill excluded), {res['blas_threads']} BLAS thread(s) per process; 'same' = greedy "
        "tokens equal to the reference row's (see tools/bench_generate.py)"
    )
    print(
        f"{'row':22s} {'tokens/s':>9s} {'vs ours':>8s} {'accept':>7s} {'weights':>10s} "
        f"{'peak mem':>9s} same tokens as"
    )
    base = rows["ours"]["tokens_per_s"]
    for name, r in rows.items():
        acc = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
        print(
            f"{name:22s} {r['tokens_per_s']:9.1f} {r['tokens_per_s'] / base:7.2f}x {acc:>7s} "
            f"{r['weight_bytes'] / 2**20:8.1f}MB {r['peak_memory_bytes'] / 2**20:7.0f}MB "
            + (f"{r['greedy_match']!s:5s} {r['reference']}" if r["reference"] else "-")
        )
    ce = res["val_ce"]
    print(
        "val CE (stdlib docstrings, unseen in training): "
        + ", ".join(f"{k} {v:.4f}" for k, v in ce.items())
        + f" (q8 {ce['q8'] / ce['float'] - 1:+.2%}, q4 {ce['q4'] / ce['float'] - 1:+.2%} vs float)"
    )


# ------------------------------------------------------------------------------ worker
class GenWorker:
    """One row: load (ours or mlx-lm), then each `run()` decodes the prompt greedily."""

    def __init__(self, name: str, ckpt: str, spec: dict):
        import mlx.core as mx
        from mlx.utils import tree_flatten

        self.mx, self.spec, self.gpu = mx, spec, mx.default_device() == mx.gpu
        self.prompt, self.tokens, self.cache_bytes = spec["prompt"], [], 0
        self.peak_rss = 0  # sampled after each run (see worker_main)
        self.draft = None
        if spec["lib"] == "ours":
            from mlx_model.engine import Engine
            from mlx_model.generation import load

            self.model = load(spec["dir"], spec.get("quantize"))[0]  # q4 + MTP: ours, on load
            self.engine = Engine(self.model)
            if spec.get("draft"):
                self.draft = load(spec["draft"])[0]
        else:
            from mlx_lm.utils import load_model

            from tools.bench_workers import _word_tokenizer

            self.model = load_model(Path(spec["dir"]))[0]
            self.tokenizer = _word_tokenizer(self.model.args.vocab_size)
            if spec.get("draft"):
                self.draft = load_model(Path(spec["draft"]))[0]
        self.weight_bytes = sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))

    def run(self) -> dict:
        from tools.bench_measure import rss_bytes

        out = self._run()
        self.peak_rss = max(self.peak_rss, rss_bytes())
        return out

    def _run(self) -> dict:
        n, spec = self.spec["new_tokens"], self.spec
        out = {"weight_bytes": self.weight_bytes}
        if spec["lib"] == "ours":
            from mlx_model.engine import Stats
            from mlx_model.sampling import SamplingParams
            from mlx_model.speculative import run

            stats, params = Stats(), SamplingParams(max_tokens=n, temperature=0.0, top_p=1.0)
            if spec.get("mtp") or self.draft is not None:
                N = spec.get("mtp") or spec["n"]
                blocks = run(self.engine, [self.prompt], params, N, self.draft, stats)
                self.tokens = [t for b in blocks for t in b[0]]
                out["acceptance"] = stats.acceptance
            else:
                self.tokens = [t[0] for t in self.engine.decode([self.prompt], params, stats)]
            out["tokens_per_s"] = stats.generated_tokens / stats.generate_time
            return out
        from mlx_lm.generate import stream_generate

        mx, kw = self.mx, {}
        if self.draft is not None:
            kw = {"draft_model": self.draft, "num_draft_tokens": spec["n"]}
        last, toks, drafted = None, [], 0
        for r in stream_generate(
            self.model,
            self.tokenizer,
            mx.array(self.prompt),
            max_tokens=n,
            sampler=lambda logp: mx.argmax(logp, axis=-1),
            **kw,
        ):
            last = r
            toks.append(int(r.token))
            drafted += bool(getattr(r, "from_draft", False))
        self.tokens = toks
        out["tokens_per_s"] = last.generation_tps
        if self.draft is not None:
            out["acceptance"] = drafted / max(len(toks), 1)
        return out
