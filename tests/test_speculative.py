"""Speculative decoding: exactness against plain decoding, the drafters' caches, the accept rule.

Models are fresh seeded random ones (tiny MLA, a shrunk MQA `seed` variant), float32, with a
larger init_std so greedy choices are not near-ties. A random MTP module rarely agrees with the
model, so the rollback paths are exercised with draft models that are noisy copies of the model
(partial acceptance) and the model itself (full acceptance). Sampling is checked statistically
on tiny vocabularies with the bounds stated at each assertion.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from conftest import decode_args
from mlx_model.cache import KVCache, StaticKVCache
from mlx_model.checkpoint import save_model
from mlx_model.data import train_tokenizer
from mlx_model.engine import Engine, Stats, decode_mask
from mlx_model.model import Model, attention_mask
from mlx_model.sampling import SamplingParams, process_logits, speculative_accept
from mlx_model.speculative import MTPDrafter, SpeculativeError, make_round, run

KINDS = ["mla", "mqa"]
ROOT = Path(__file__).resolve().parents[1]


def pydoc_topics() -> list[str]:
    """Python's pydoc topic texts (offline English), one document per topic, sorted."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def new_model(args, seed: int) -> Model:
    mx.random.seed(seed)
    m = Model(args)
    m.eval()
    mx.eval(m.parameters())
    return m


@pytest.fixture(scope="module")
def models():
    return {
        k: new_model(decode_args(k, num_nextn_predict_layers=1), i) for i, k in enumerate(KINDS)
    }


def noisy_copy(model: Model, scale: float, seed: int) -> Model:
    mx.random.seed(seed)
    d = Model(model.args)
    d.eval()
    d.update(tree_map(lambda p: p + scale * mx.random.normal(p.shape), model.parameters()))
    mx.eval(d.parameters())
    return d


def prompts(seed: int, lens=(3, 9, 6), vocab: int = 400) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).tolist() for n in lens]


def spec_tokens(engine, ps, params, n, draft=None, compiled=False, stats=None) -> list[list[int]]:
    out = [[] for _ in ps]
    for block in run(engine, ps, params, n, draft, stats, compiled):
        assert len({len(b) for b in block}) == 1  # every row gets the same number of tokens
        for r, toks in enumerate(block):
            out[r] += toks
    return out


def plain_tokens(engine, ps, params, compiled=False) -> list[list[int]]:
    return np.array(list(engine.decode(ps, params, compiled=compiled))).T.tolist()


# ------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_speculative_equals_plain(models, kind):
    """MTP drafts and draft models (partial and full acceptance): the same tokens as plain
    greedy decoding, batched (left-padded) and single, for several draft lengths."""
    engine = Engine(models[kind])
    params = SamplingParams(max_tokens=24, temperature=0)
    ps = prompts(1)
    plain = plain_tokens(engine, ps, params)
    partial = noisy_copy(models[kind], 0.002, 5)
    for n in (1, 3):
        assert spec_tokens(engine, ps, params, n) == plain
        assert spec_tokens(engine, ps[1:2], params, n) == plain[1:2]
        for draft, low in ((partial, 0.1), (models[kind], 1.0)):
            stats = Stats()
            assert spec_tokens(engine, ps[1:2], params, n, draft, stats=stats) == plain[1:2]
            assert stats.acceptance >= low, stats.report()  # the rollback paths really ran
            assert spec_tokens(engine, ps, params, n, draft) == plain


def test_compiled_speculative_step_equals_eager(models):
    engine = Engine(models["mla"])
    params = SamplingParams(max_tokens=12, temperature=0)
    ps = prompts(2, (4, 7))
    want = plain_tokens(engine, ps, params)
    draft = noisy_copy(models["mla"], 0.002, 6)
    assert spec_tokens(engine, ps, params, 3, compiled=True) == want
    assert spec_tokens(engine, ps, params, 2, draft, compiled=True) == want


def test_mtp_drafter_cache_matches_uncached_mtp(models):
    """After the prompt and after every verification step, the MTP drafter's next draft logits
    equal MTP module 0 run without a cache over the whole accepted sequence (rel err < 1e-4)."""
    model = models["mla"]
    engine = Engine(model)
    params = SamplingParams(max_tokens=16, temperature=0)
    prompt = prompts(3, (7,))[0]
    pre = engine.prefill([prompt])
    c = mx.argmax(pre.logits, -1)
    temp, key = mx.array(0.0), mx.random.key(0)
    drafter = MTPDrafter(model, 3, params)
    dstate, key = drafter.start(pre, c, temp, key, 64)
    main = [s for k in pre.cache for s in StaticKVCache.from_cache(k, 64).state]
    round_ = make_round(model, drafter, params, len(pre.cache))
    seq, offset = prompt + [c.item()], mx.array(len(prompt))

    def check(q1: mx.array) -> None:
        x = mx.array([seq[:-1]])
        _, h, _ = model.forward(x, mask=attention_mask(x.shape[1]))
        ref = model.mtp_block(0, h, mx.array([seq[1:]]))[0][:, -1]
        err = float(mx.linalg.norm(q1 - ref) / mx.linalg.norm(ref))
        assert err < 1e-4, f"draft logits rel err {err:.2e} after {len(seq)} tokens"

    check(dstate[1])
    for _ in range(5):
        out, kept, c, key, offset, *state = round_(c, key, temp, offset, pre.pad, *main, *dstate)
        seq += out[0, : kept.item()].tolist()
        main, dstate = state[: len(main)], state[len(main) :]
        check(dstate[1])


@pytest.mark.parametrize("kind", KINDS)
def test_block_at_one_row_equals_the_full_block(models, kind):
    """Block(x, cache, at=j) (all L rows cached, one row computed: the MTP re-read) gives row j
    of the full cached block and the same cache, for every j (rel err < 1e-5)."""
    model = models[kind]
    block = model.mtp[0].block
    rng = np.random.default_rng(7)
    B, T, L, S = 2, 5, 4, 16
    pad = mx.array([0, 2])
    D = model.args.hidden_size
    prompt = mx.array(rng.standard_normal((B, T, D)).astype(np.float32))
    x = mx.array(rng.standard_normal((B, L, D)).astype(np.float32))
    for j in range(L):
        outs = []
        for at in (None, mx.array(j)):
            kv = KVCache()
            block(prompt, attention_mask(T, 0, pad), kv)
            cache = StaticKVCache.from_cache(kv, S)
            off = mx.array(T)
            mask = decode_mask(off, pad, S, L) if at is None else decode_mask(off + j, pad, S)
            y = block(x, mask, cache, at)[0]
            outs.append((y[:, j] if at is None else y[:, 0], cache.a, cache.b))
        for got, want in zip(outs[1], outs[0]):
            err = float(mx.linalg.norm(got - want) / mx.linalg.norm(want))
            assert err < 1e-5, f"row {j}: rel err {err:.2e}"


# ---------------------------------------------------------------------------- sampling
def test_accept_rule_keeps_the_model_distribution():
    """speculative_accept on fixed p, q over 5 tokens, 2 drafts, 200k rows at once: the first
    new token has distribution p_1; after an accepted first draft, the second has p_2; after
    two, the bonus token has p_3. Bound: total variation < 0.01 (~5 sigma at these counts)."""
    rng = np.random.default_rng(0)
    B, V, N = 200_000, 5, 2
    p_logits = rng.normal(size=(N + 1, V)).astype(np.float32) * 1.5
    q_logits = rng.normal(size=(N, V)).astype(np.float32) * 1.5
    q = np.exp(q_logits) / np.exp(q_logits).sum(-1, keepdims=True)
    p = np.exp(p_logits) / np.exp(p_logits).sum(-1, keepdims=True)
    drafts = np.stack([rng.choice(V, size=B, p=q[j]) for j in range(N)], 1)
    kept, nxt = speculative_accept(
        mx.array(np.broadcast_to(p_logits, (B, N + 1, V))),
        mx.array(np.broadcast_to(q_logits, (B, N, V))),
        mx.array(drafts),
        False,
        mx.random.key(1),
    )
    kept, nxt = np.array(kept), np.array(nxt)
    first = np.where(kept >= 1, drafts[:, 0], nxt)
    second = np.where(kept >= 2, drafts[:, 1], nxt)[kept >= 1]
    bonus = nxt[kept == 2]
    for got, want, what in (
        (first, p[0], "first"),
        (second, p[1], "second"),
        (bonus, p[2], "bonus"),
    ):
        tv = 0.5 * np.abs(np.bincount(got, minlength=V) / len(got) - want).sum()
        assert tv < 0.01, f"{what} token: total variation {tv:.4f} over {len(got)} samples"
    assert 0 < (kept == 0).mean() < 1 and (kept == 2).any()  # all branches were taken


def exact_two_token_dist(model: Model, prompt: list[int], params: SamplingParams) -> np.ndarray:
    """P(t1, t2 | prompt) under the filtered distribution, from full forward passes [V, V]."""
    V = model.args.vocab_size
    t = mx.array(params.temperature)
    lg = model(mx.array([prompt]))[:, -1].astype(mx.float32)
    p1 = np.array(mx.softmax(process_logits(lg, None, params, t), -1))[0]
    x = mx.array([prompt + [v] for v in range(V)])
    lg2 = model(x)[:, -1].astype(mx.float32)
    p2 = np.array(mx.softmax(process_logits(lg2, None, params, t), -1))  # [V, V]
    return p1[:, None] * p2


@pytest.mark.parametrize("drafter", ["mtp", "draft"])
def test_speculative_sampling_distribution(drafter):
    """Tiny vocabulary (8 tokens), 3000 rows of one prompt sampled together with 2 drafts:
    the empirical joint law of the first two new tokens against the exact one (temperature 0.9,
    top-k 6, top-p 0.95, min-p 0.02). Bound: total variation < 0.08 (the expected value for
    plain sampling at this count is ~0.04)."""
    args = decode_args("mla", vocab_size=8, num_nextn_predict_layers=1, init_std=0.15)
    model = new_model(args, 11)
    draft = noisy_copy(model, 0.05, 12) if drafter == "draft" else None
    params = SamplingParams(max_tokens=2, temperature=0.9, top_k=6, top_p=0.95, min_p=0.02, seed=3)
    prompt = [1, 5, 2, 7, 3]
    want = exact_two_token_dist(model, prompt, params)
    rows = 3000
    got = np.array(spec_tokens(Engine(model), [prompt] * rows, params, 2, draft))  # [rows, 2]
    emp = np.bincount(got[:, 0] * 8 + got[:, 1], minlength=64).reshape(8, 8) / rows
    tv = 0.5 * np.abs(emp - want).sum()
    assert tv < 0.08, f"{drafter}: total variation {tv:.3f} from the exact two-token law"


# --------------------------------------------------------------------------- refusals
def test_refusals(models):
    no_mtp = new_model(decode_args("mla"), 3)
    engine, p = Engine(no_mtp), prompts(4, (5,))
    greedy = SamplingParams(max_tokens=4, temperature=0)
    with pytest.raises(SpeculativeError, match="no MTP weights"):
        spec_tokens(engine, p, greedy, 2)
    with pytest.raises(SpeculativeError, match="--num-draft"):
        spec_tokens(Engine(models["mla"]), p, greedy, 0)
    with pytest.raises(SpeculativeError, match="penalties"):
        spec_tokens(Engine(models["mla"]), p, SamplingParams(repetition_penalty=1.2), 2)
    other = new_model(decode_args("mla", vocab_size=300), 4)
    with pytest.raises(SpeculativeError, match="same tokenizer"):
        spec_tokens(Engine(models["mla"]), p, greedy, 2, other)


# ------------------------------------------------------------------------------- CLI
def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mlx_model.generate", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, models):
    tok = train_tokenizer(pydoc_topics()[:40], vocab_size=400)
    d = tmp_path_factory.mktemp("spec")
    save_model(d / "mtp", models["mla"], tok)
    save_model(d / "plain", new_model(decode_args("mla"), 3), tok)
    other = train_tokenizer(pydoc_topics()[40:80], vocab_size=380)
    save_model(d / "other", new_model(decode_args("mla"), 4), other)
    return d


def test_cli_speculative_prints_the_same_and_refuses_bad_input(ckpts):
    m = ("--model", str(ckpts / "mtp"), "--prompt", "The", "--max-tokens", "24")
    greedy = (*m, "--temperature", "0", "--no-compile")
    plain = run_cli(*greedy)
    spec = run_cli(*greedy, "--speculative", "mtp", "--num-draft", "2", "--verbose")
    draft = run_cli(*greedy, "--draft-model", str(ckpts / "plain"))
    assert plain.returncode == spec.returncode == draft.returncode == 0, spec.stderr
    assert spec.stdout.startswith(plain.stdout) and "acceptance" in spec.stdout
    assert draft.stdout == plain.stdout
    for flags, words in (
        (["--model", str(ckpts / "plain"), "--speculative", "mtp"], ["no MTP weights"]),
        (["--speculative", "mtp", "--num-draft", "0"], ["--num-draft 0"]),
        (["--quantize", "3"], ["--quantize 3"]),
        (["--draft-model", str(ckpts / "other")], ["tokenizer"]),
    ):
        r = run_cli(*m, *flags)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and r.stdout == "" and len(lines) == 1, r.stderr
        assert lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
        assert all(w in lines[0] for w in words), lines[0]


def test_generate_api_speculative(ckpts):
    from mlx_model import generate, load

    model, tok = load(str(ckpts / "mtp"))
    kw = dict(max_tokens=20, temperature=0, compiled=False)
    plain = generate(model, tok, ["The", "A cat"], **kw)
    assert generate(model, tok, ["The", "A cat"], speculative="mtp", num_draft=2, **kw) == plain
    draft = load(str(ckpts / "plain"))[0]
    assert generate(model, tok, "The", draft_model=draft, **kw) == plain[0]
