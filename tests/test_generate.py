"""Tests for generation: caches, sampling filters, beam search, batching and the CLI.

Models are fresh seeded random ones (tiny MLA preset and a shrunk MQA `seed` variant) with a
larger init_std than training uses, so next-token distributions are peaked and greedy choices
are not near-ties. Float32 throughout; tolerances are stated at each comparison.
Most tests run the decode step eagerly (compiled=False): on the CPU backend the compiled step's
first use JIT-compiles dozens of kernels (~1 s each when the kernel cache is cold);
test_compiled_step_equals_eager checks that the compiled step gives the same tokens.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import decode_args
from mlx_model import sampling as S
from mlx_model.cache import StaticKVCache, make_cache
from mlx_model.checkpoint import save_model
from mlx_model.data import train_tokenizer
from mlx_model.model import Model
from mlx_model.presets import preset

G = importlib.import_module("mlx_model.generation")  # text level: generate, stream, _push
D = importlib.import_module("mlx_model.engine")  # token level: Engine, masks
ROOT = Path(__file__).resolve().parents[1]


def pydoc_topics() -> list[str]:
    """Python's pydoc topic texts (offline English), one document per topic, sorted."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


KINDS = ["mla", "mqa"]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def close(a, b, tol: float, what: str) -> None:
    e = rel_err(a, b)
    d = float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
    assert e < tol, f"{what}: rel err {e:.2e} (tol {tol:.0e}), max abs diff {d:.2e}"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(pydoc_topics()[:40], vocab_size=400)


@pytest.fixture(scope="module")
def models():
    out = {}
    for i, kind in enumerate(KINDS):
        mx.random.seed(i)
        m = Model(decode_args(kind))
        m.eval()
        mx.eval(m.parameters())
        out[kind] = m
    return out


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, models, tok) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    save_model(d, models["mla"], tok)
    return d


def rand_ids(seed: int, shape, vocab: int = 400) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(1, vocab, size=shape))


# ----------------------------------------------------------------------------------- caches
@pytest.mark.parametrize("kind", KINDS)
def test_prefill_plus_cached_steps_equal_full_forward(models, kind):
    """KVCache and the fixed-size StaticKVCache (compiled step's cache): rel err < 1e-5."""
    model = models[kind]
    ids = rand_ids(1, (2, 12))
    full = model(ids)
    cache = make_cache(model.args)
    parts = [model(ids[:, :5], cache=cache)]
    static = [StaticKVCache.from_cache(c, 16) for c in cache]
    parts_static = [parts[0]]
    pad = mx.zeros((2,), mx.int32)
    for t in range(5, 12):
        parts.append(model(ids[:, t : t + 1], cache=cache))
        mask = D.decode_mask(static[0].offset, pad, 16)
        parts_static.append(model(ids[:, t : t + 1], cache=static, mask=mask))
        for c in static:
            c.offset = c.offset + 1
    close(mx.concatenate(parts, 1), full, 1e-5, f"{kind} KVCache decode vs full")
    close(mx.concatenate(parts_static, 1), full, 1e-5, f"{kind} StaticKVCache decode vs full")


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_prefill_and_decode_equal_unpadded(models, kind):
    """Pad keys are masked in prefill and every decode step: rel err < 1e-4 (RoPE shifts)."""
    model = models[kind]
    ids = rand_ids(2, (1, 10))
    full = model(ids)
    pad_n = 4
    x = mx.concatenate([mx.full((1, pad_n), 7), ids[:, :6]], 1)
    pad = mx.array([pad_n])
    cache = make_cache(model.args)
    pre = model(x, cache=cache, mask=D.prefill_mask(x.shape[1], pad))[:, pad_n:]
    static = [StaticKVCache.from_cache(c, 20) for c in cache]
    steps = []
    for t in range(6, 10):
        steps.append(
            model(ids[:, t : t + 1], cache=static, mask=D.decode_mask(static[0].offset, pad, 20))
        )
        for c in static:
            c.offset = c.offset + 1
    close(mx.concatenate([pre] + steps, 1), full, 1e-4, f"{kind} padded vs unpadded")


def test_absorbed_mla_equals_naive(models):
    attn = models["mla"].layers[0].self_attn
    x = mx.array(np.random.default_rng(3).normal(size=(2, 9, 64)).astype(np.float32))
    q_nope, q_rope, latent, k_rope = attn.project(x, 0)
    q_nope, q_rope = q_nope[:, :, -1:], q_rope[:, :, -1:]  # the last query against all keys
    naive = attn.naive(q_nope, q_rope, latent, k_rope, None)
    close(
        attn.absorbed(q_nope, q_rope, latent, k_rope, None), naive, 1e-5, "absorbed vs naive, L=1"
    )
    mask = D.prefill_mask(9, None)
    full = attn.project(x, 0)
    close(
        attn.absorbed(*full, mask), attn.naive(*full, mask), 1e-5, "absorbed vs naive, causal L=9"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_cache_holds_exactly_the_latent(models, kind):
    model = models[kind]
    a = model.args
    cache = make_cache(a)
    mx.eval(model(rand_ids(4, (3, 7)), cache=cache))
    per_layer = a.kv_lora_rank + a.qk_rope_head_dim if kind == "mla" else 2 * a.head_dim
    n = sum(c.numbers_per_token() for c in cache)
    assert n == a.num_hidden_layers * per_layer == a.cache_numbers_per_token()
    assert sum(c.nbytes_per_token() for c in cache) == 4 * n
    assert all(c.offset == 7 and c.a.shape[:2] == (3, 1) for c in cache)  # one shared head
    static = StaticKVCache.from_cache(cache[0], 9)
    assert static.numbers_per_token() == per_layer and static.a.shape == (
        3,
        1,
        9,
        static.a.shape[3],
    )


# ------------------------------------------------------------------------ greedy and beams
def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """No cache: the full sequence through the model for every new token."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    return ids[len(prompt) :]


def seq_logprob(model, prompt: list[int], gen: list[int]) -> float:
    ids = mx.array([list(prompt) + list(gen)])
    logits = model(ids)[0, len(prompt) - 1 : -1].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return float(mx.take_along_axis(logp, mx.array(gen)[:, None], axis=-1).sum().item())


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_equals_top_k_1_equals_beam_1(models, kind):
    model, prompt, n = models[kind], rand_ids(5, (9,)).tolist(), 12
    params = S.SamplingParams(max_tokens=n, temperature=0)
    greedy = [t[0] for t in D.Engine(model).decode([prompt], params, compiled=False)]
    top1 = S.SamplingParams(max_tokens=n, temperature=1.5, top_k=1, top_p=1.0, seed=3)
    assert greedy == reference_greedy(model, prompt, n)
    assert [t[0] for t in D.Engine(model).decode([prompt], top1, compiled=False)] == greedy
    assert D.Engine(model).beam_search(prompt, 1, n).tokens == greedy


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_logprob_at_least_greedy(models, kind):
    model, n = models[kind], 8
    for seed in range(3):
        prompt = rand_ids(10 + seed, (6,)).tolist()
        greedy = reference_greedy(model, prompt, n)
        res = D.Engine(model).beam_search(prompt, 4, n)
        lp = seq_logprob(model, prompt, res.tokens)
        assert abs(lp - res.logprob) < 1e-3, "beam search's own sum of log-probabilities is wrong"
        assert lp >= seq_logprob(model, prompt, greedy) - 1e-4


class TableModel:
    """A fake LM: next-token distribution depends only on the last token (rows of `probs`)."""

    def __init__(self, probs: np.ndarray):
        self.logits = mx.array(np.log(np.maximum(probs, 1e-30)).astype(np.float32))
        self.args = preset("tiny").replace(num_hidden_layers=0, vocab_size=len(probs))

    def parameters(self) -> dict:
        return {}

    def __call__(self, ids: mx.array, cache=None, mask=None) -> mx.array:
        return self.logits[ids]  # [B, T, V]

    def forward(self, ids: mx.array, cache=None, mask=None):
        return self.logits[ids], None, []


def test_beam_search_beats_myopic_greedy():
    # tokens: 0 start, 1 A, 2 B, 3 C, 4 D. start -> A 0.6 | B 0.4; A -> flat; B -> C 0.99.
    p = np.full((5, 5), 0.2)
    p[0] = [0, 0.6, 0.4, 0, 0]
    p[2] = [0.0025, 0.0025, 0.0025, 0.99, 0.0025]
    fake = TableModel(p)
    greedy = D.Engine(fake).beam_search([0], num_beams=1, max_tokens=2)
    beam = D.Engine(fake).beam_search([0], num_beams=2, max_tokens=2)
    assert greedy.tokens[0] == 1 and beam.tokens == [2, 3]
    assert math.isclose(greedy.logprob, math.log(0.6) + math.log(0.2), rel_tol=1e-5)
    assert math.isclose(beam.logprob, math.log(0.4) + math.log(0.99), rel_tol=1e-5)
    assert beam.logprob > greedy.logprob + 0.5


def test_beam_search_eos_and_length_penalty():
    # start -> eos 0.5 | A 0.5; A -> A 0.9. With eos=4: short "eos" (-0.69) vs "A A A" (-0.90).
    p = np.full((5, 5), 0.025)
    p[0] = [0, 0.5, 0, 0, 0.5]
    p[1] = [0.025, 0.9, 0.025, 0.025, 0.025]
    fake = TableModel(p)
    flat = D.Engine(fake).beam_search([0], 2, 3, eos_id=4, length_penalty=0.0)
    assert flat.tokens == [4] and math.isclose(flat.score, math.log(0.5), rel_tol=1e-5)
    long = D.Engine(fake).beam_search([0], 2, 3, eos_id=4, length_penalty=1.0)  # -0.90/3 > -0.69
    assert long.tokens == [1, 1, 1]
    assert math.isclose(long.score, (math.log(0.5) + 2 * math.log(0.9)) / 3, rel_tol=1e-5)


def test_beam_eos_counts_only_among_top_beams():
    # start -> A 0.6 | eos 0.4; A -> A 0.3 (else flat). Width 1 must not finish on the
    # second-ranked eos (-0.92 beats A A at -1.71): it follows greedy, as in Hugging Face.
    p = np.full((5, 5), 0.175)
    p[0] = [0, 0.6, 0, 0, 0.4]
    p[1, 1] = 0.3
    res = D.Engine(TableModel(p)).beam_search([0], 1, 2, eos_id=4, length_penalty=0.0)
    assert res.tokens[0] == 1 and len(res.tokens) == 2
    # Width 2, eos = 5. Step 2 ranks: B-eos, A-C, A-eos (rank 2: not a hypothesis), B-D.
    # Step 3: A-C-eos finishes; with early stopping and length_penalty 1 it beats B-eos
    # (-1.30/3 > -1.16/2). Counting A-eos would stop early at step 2 with B-eos.
    p = np.zeros((6, 6))
    p[0, 1:3] = [0.55, 0.45]
    p[1] = [0.0125, 0.0125, 0.0125, 0.5, 0.0125, 0.45]
    p[2] = [0.025, 0.025, 0.025, 0.025, 0.2, 0.7]
    p[3] = [0.002] * 5 + [0.99]
    p[4] = 1 / 6
    res = D.Engine(TableModel(p)).beam_search(
        [0], 2, 3, eos_id=5, length_penalty=1.0, early_stopping=True
    )
    assert res.tokens == [1, 3, 5]
    assert math.isclose(
        res.score, (math.log(0.55) + math.log(0.5) + math.log(0.99)) / 3, rel_tol=1e-5
    )


# --------------------------------------------------------------------------------- filters
def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(scale=3.0, size=(4, 60)).astype(np.float32)


def kept(x: mx.array) -> np.ndarray:
    return np.isfinite(np.array(x))


@pytest.mark.parametrize("k", [0, 1, 5, 59, 60])
def test_top_k_filter(logits, k):
    want = np.ones_like(logits, bool)
    if 0 < k < 60:
        want = logits >= np.sort(logits, -1)[:, -k][:, None]
    got = S.top_k_filter(mx.array(logits), k)
    assert (kept(got) == want).all() and (want.sum(-1) == (k if 0 < k < 60 else 60)).all()
    np.testing.assert_array_equal(np.array(got)[want], logits[want])


@pytest.mark.parametrize("p", [0.05, 0.3, 0.8, 0.95, 1.0])
def test_top_p_filter(logits, p):
    probs = np_softmax(logits.astype(np.float64))
    want = np.zeros_like(logits, bool)
    for r in range(len(logits)):
        order = np.argsort(-probs[r])
        n = int(np.searchsorted(np.cumsum(probs[r][order]), p) + 1)  # smallest prefix >= p
        want[r, order[: min(n, 60)]] = True
    got = S.top_p_filter(mx.array(logits), p)
    assert (kept(got) == want).all()


@pytest.mark.parametrize("m", [0.0, 0.01, 0.1, 0.5, 0.9])
def test_min_p_filter(logits, m):
    probs = np_softmax(logits.astype(np.float64))
    want = probs >= m * probs.max(-1, keepdims=True)
    assert (kept(S.min_p_filter(mx.array(logits), m)) == want).all()


def test_penalties_and_temperature(logits):
    counts = np.random.default_rng(1).integers(0, 3, size=logits.shape).astype(np.float32)
    seen = counts > 0
    want = np.where(seen, np.where(logits > 0, logits / 1.3, logits * 1.3), logits)
    got = S.repetition_penalty(mx.array(logits), mx.array(counts), 1.3)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-6)
    want = logits - 0.5 * seen - 0.25 * counts
    got = S.presence_frequency_penalty(mx.array(logits), mx.array(counts), 0.5, 0.25)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-6, atol=1e-6)
    params = S.SamplingParams(top_p=1.0)
    got = S.process_logits(mx.array(logits), None, params, 0.5)
    np.testing.assert_allclose(
        np.array(mx.softmax(got, -1)), np_softmax(logits / 0.5), rtol=1e-4, atol=1e-7
    )
    sched = S.SamplingParams(max_tokens=5, temperature=1.0, temperature_end=0.0)
    assert [sched.temperature_at(i) for i in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_sampler_draws_only_kept_tokens(logits):
    sample = S.make_sampler(S.SamplingParams(temperature=2.0, top_k=3, top_p=1.0))
    allowed = np.argsort(-logits, -1)[:, :3]
    key = mx.random.key(0)
    for _ in range(20):
        tok, key = sample(mx.array(logits), None, mx.array(2.0), key)
        assert all(t in allowed[r] for r, t in enumerate(tok.tolist()))


# ---------------------------------------------------------------------------- text level
def test_same_seed_same_text(models, tok):
    kw = dict(
        max_tokens=16, temperature=1.0, top_p=0.95, repetition_penalty=1.2, seed=11, compiled=False
    )
    a = G.generate(models["mla"], tok, "The cat", **kw)
    assert a == G.generate(models["mla"], tok, "The cat", **kw) and a
    assert G.generate(models["mla"], tok, "The cat", **{**kw, "temperature": 5.0, "seed": 12}) != a


@pytest.mark.parametrize("kind", KINDS)
def test_batched_equals_one_by_one(models, kind):
    model = models[kind]
    prompts = [rand_ids(20 + i, (n,)).tolist() for i, n in enumerate([3, 9, 6])]
    params = S.SamplingParams(max_tokens=10, temperature=0)
    batched = np.array(list(D.Engine(model).decode(prompts, params, compiled=False))).T.tolist()
    for p, b in zip(prompts, batched):
        assert b == [t[0] for t in D.Engine(model).decode([p], params, compiled=False)]


def test_presence_penalty_bans_seen_tokens(models):
    """A huge presence penalty under greedy: no prompt token and no repeated token."""
    model, prompt = models["mqa"], rand_ids(40, (5,)).tolist()
    params = S.SamplingParams(max_tokens=12, temperature=0, presence_penalty=1e4)
    out = [t[0] for t in D.Engine(model).decode([prompt], params, compiled=False)]
    plain = [
        t[0]
        for t in D.Engine(model).decode(
            [prompt], S.SamplingParams(max_tokens=12, temperature=0), compiled=False
        )
    ]
    assert len(set(out)) == len(out) and not set(out) & set(prompt)
    assert len(set(plain)) < len(plain) or set(plain) & set(prompt)  # the penalty did something


def test_temperature_schedule_ends_greedy(models):
    """temperature 8 -> 0 over 3 tokens: the last token is the argmax, the first ones random."""
    model, prompt = models["mla"], rand_ids(50, (4,)).tolist()
    firsts = set()
    for seed in range(6):
        params = S.SamplingParams(
            max_tokens=3, temperature=8.0, temperature_end=0.0, top_p=1.0, seed=seed
        )
        out = [t[0] for t in D.Engine(model).decode([prompt], params, compiled=False)]
        firsts.add(out[0])
        assert out[-1] == reference_greedy(model, prompt + out[:-1], 1)[0]
    assert len(firsts) > 1


def test_compiled_step_equals_eager(models):
    """The shipped mx.compile'd step (cache arrays in and out) against the eager one: left-padded
    batch, greedy, and seeded sampling with a penalty, a filter and a temperature schedule."""
    model = models["mla"]
    prompts = [rand_ids(30 + i, (n,)).tolist() for i, n in enumerate([4, 8])]
    for params in (
        S.SamplingParams(max_tokens=10, temperature=0),
        S.SamplingParams(
            max_tokens=10,
            temperature=1.0,
            temperature_end=0.5,
            top_p=0.9,
            frequency_penalty=0.5,
            seed=5,
        ),
    ):
        eager = list(D.Engine(model).decode(prompts, params, compiled=False))
        assert list(D.Engine(model).decode(prompts, params, compiled=True)) == eager


def test_batched_text_and_stop_strings(models, tok):
    prompts = ["The future of", "In the year 2050, humans will", "A"]
    kw = dict(max_tokens=12, temperature=0, compiled=False)
    batched = G.generate(models["mla"], tok, prompts, **kw)
    single = [G.generate(models["mla"], tok, p, **kw) for p in prompts]
    assert batched == single
    text = single[1]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = G.generate(models["mla"], tok, prompts[1], stop=["zzz", stop], **kw)
    assert cut == text[: text.find(stop)]


def test_one_new_token(models, tok):
    model = models["mla"]
    ids = [tok.bos_id] + tok.encode("The cat")
    want = tok.decode(reference_greedy(model, ids, 1))
    assert G.generate(model, tok, "The cat", max_tokens=1, temperature=0, compiled=False) == want
    assert G.generate(model, tok, "The cat", max_tokens=1, num_beams=3) == want


def test_detokenizer_stops_at_eos_and_split_stop_string(tok):
    ids = tok.encode("hello world, and more")
    row, out = G._Row(), ""
    for t in ids:
        out += G._push(row, t, tok, ["d, a"], True)
    assert row.done and out == "hello worl"
    row, out = G._Row(), ""
    for t in tok.encode("abc") + [tok.eos_id] + tok.encode("xyz"):
        if not row.done:
            out += G._push(row, t, tok, [], True)
    assert out == "abc"


# ------------------------------------------------------------------------------------- CLI
def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "mlx_model.generate", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2 and r.stdout == "", r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize(
    "flags, word",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-k", "-1"], "--top-k"),
        (["--min-p", "1"], "--min-p"),
        (["--num-beams", "0"], "--num-beams"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--prompt", ""], "empty prompt"),
    ],
)
def test_cli_bad_values(ckpt_dir, flags, word):
    args = ["--model", str(ckpt_dir), *flags]
    assert_one_line_error(
        run_cli(*(args if "--prompt" in flags else args + ["--prompt", "Hi"])), word
    )


def test_cli_bad_model_dirs(tmp_path, models, tok):
    assert_one_line_error(run_cli("--model", str(tmp_path), "--prompt", "Hi"), "config.json")
    assert_one_line_error(run_cli("--prompt", "Hi", cwd=tmp_path), "python -m mlx_model.train")
    small = Model(decode_args("mla").replace(vocab_size=300))
    save_model(tmp_path / "m", small, tok)  # tokenizer has 400 tokens, the model 300
    assert_one_line_error(run_cli("--model", str(tmp_path / "m"), "--prompt", "Hi"), "400", "300")


def test_cli_long_prompt_and_generation(ckpt_dir, tmp_path):
    long = "word " * 400  # > 256 positions
    assert_one_line_error(run_cli("--model", str(ckpt_dir), "--prompt", long), "--truncate-prompt")
    f = tmp_path / "prompts.txt"
    f.write_text("The future of\n\nClimate change will\n")
    m = ("--model", str(ckpt_dir), "--no-compile")
    r1 = run_cli(*m, "--prompt", "The", "--max-tokens", "8", "--temperature", "0")
    r2 = run_cli(
        *m,
        "--prompts-file",
        str(f),
        "--prompt",
        "The",
        "--num-beams",
        "3",
        "--max-tokens",
        "6",
        "--truncate-prompt",
        "--verbose",
    )
    r3 = run_cli(
        *m, "--prompt", long, "--truncate-prompt", "--max-tokens", "4", "--temperature", "0"
    )
    for r in (r1, r2, r3):
        assert r.returncode == 0, r.stderr
    assert r1.stdout.startswith("The") and "tokens/s" in r1.stderr and "80 numbers" in r1.stderr
    assert (
        all(p in r2.stdout for p in ("The future of", "Climate change will"))
        and "tokens/s" in r2.stdout
    )
