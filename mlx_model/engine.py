"""The generation engine: one owner for the cache, the prefill and the compiled decode steps.

Every decoding strategy runs through `Engine`: sampling and greedy (`decode`), beam search
(`beam_search`) and speculative decoding (mlx_model/speculative.py `run(engine, ...)`, drafts
from the model's own MTP modules or from a draft model, which uses the engine's prefill,
static caches, masks and compiled-step cache). The prompt (left-padded when several decode
together) runs through the model at once, filling a per-layer KVCache (MLA: the latent + shared
rope key; MQA: one K/V head); decoding then copies it into fixed-size buffers (StaticKVCache) so
that one mx.compile'd function, with the cache arrays as its inputs and outputs, serves every
position; pad keys are masked in both phases.

The Engine owns its compiled functions in `self.steps`, keyed by `StepKey` (what the traced graph
depends on: strategy, sampling settings, penalties, draft length). A trace holds the weights as
constants, so the engine drops its steps when the model's weight arrays change (MLX arrays are
immutable: training or loading replaces them). Reuse one Engine to decode many times at full
speed. Text (detokenizing, stop strings) is mlx_model/generation.py; functions on logits are
mlx_model/sampling.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx

from .cache import KVCache, StaticKVCache, make_cache
from .model import attention_mask
from .sampling import SamplingParams, make_sampler


@dataclass
class Stats:
    """Throughput of one generate call (summed over calls when reused)."""

    prompt_tokens: int = 0
    prompt_time: float = 0.0
    generated_tokens: int = 0
    generate_time: float = 0.0
    cache_numbers_per_token: int = 0  # over all layers, per batch row
    cache_bytes_per_token: int = 0
    verify_steps: int = 0  # speculative decoding: verification forward passes
    drafted: int = 0  # draft tokens proposed (per batch, counted once per verify step)
    accepted: int = 0  # draft tokens kept

    def report(self) -> str:
        pt = f"{self.prompt_tokens / self.prompt_time:.1f}" if self.prompt_time else "-"
        gt = self.generated_tokens / max(self.generate_time, 1e-9)
        out = (
            f"prompt: {self.prompt_tokens} tokens, {pt} tokens/s | "
            f"generation: {self.generated_tokens} tokens, {gt:.1f} tokens/s | "
            f"cache: {self.cache_numbers_per_token} numbers = "
            f"{self.cache_bytes_per_token} bytes per token"
        )
        if self.verify_steps:
            out += (
                f" | speculative: acceptance {self.acceptance:.1%}, "
                f"{self.tokens_per_step:.2f} tokens per verify step"
            )
        return out

    @property
    def acceptance(self) -> float:
        """Share of proposed draft tokens that were kept."""
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_step(self) -> float:
        """New tokens per verification pass (accepted drafts + the corrected token)."""
        return (self.accepted + self.verify_steps) / max(self.verify_steps, 1)


# ------------------------------------------------------------------------------ masks
def prefill_mask(T: int, pad: mx.array | None) -> Any:
    """Causal mask hiding left padding (pad queries see themselves, so no row is empty)."""
    return attention_mask(T, 0, pad)


def decode_mask(offset: mx.array, pad: mx.array, S: int, L: int = 1) -> mx.array:
    """[B, 1, L, S]: L new queries at offset..offset+L-1 over a fixed buffer of S keys; query j
    sees keys written so far (<= offset + j) that are not padding."""
    keys = mx.arange(S)
    seen = keys[None, :] <= offset + mx.arange(L)[:, None]  # [L, S]
    return seen[None, None] & (keys[None] >= pad[:, None])[:, None, None, :]


# ----------------------------------------------------------------------------- engine
@dataclass(frozen=True)
class StepKey:
    """What a compiled function's trace depends on (besides the weights and shapes)."""

    kind: str  # "decode", "mtp", "draft"
    params: str  # repr of the sampling settings the graph bakes in
    penalised: bool = False
    num_draft: int = 0


@dataclass
class Prefill:
    """The prompt run through the model: caches filled, last logits and all hidden states."""

    x: mx.array  # [B, T] left-padded prompt ids
    pad: mx.array  # [B] padding per row
    cache: list[KVCache]
    logits: mx.array  # [B, V] at the last position
    hidden: mx.array  # [B, T, D] last hidden state before the final norm


class Engine:
    """Decoding for one model: prefill, compiled steps and every strategy that uses them."""

    def __init__(self, model: Any):
        self.model = model
        self.steps: dict[StepKey, Callable] = {}
        self._weights: tuple[int, ...] = ()

    # -------------------------------------------------------------------- shared parts
    def compiled(self, key: StepKey, build: Callable[[], Callable]) -> Callable:
        """The compiled function for `key`, traced once per engine while the weights stay."""
        from mlx.utils import tree_flatten

        weights = tuple(id(a) for _, a in tree_flatten(self.model.parameters()))
        if weights != self._weights:  # new weights: every trace is stale
            self.steps.clear()
            self._weights = weights
        if key not in self.steps:
            self.steps[key] = mx.compile(build())
        return self.steps[key]

    def prefill(self, prompts: Sequence[Sequence[int]], model: Any = None) -> Prefill:
        """Run the left-padded prompts through `model` (default: the engine's) with a fresh cache."""
        model = model if model is not None else self.model
        lens = [len(p) for p in prompts]
        T = max(lens)
        x = mx.array([[0] * (T - n) + list(p) for n, p in zip(lens, prompts)])  # [B, T]
        pad = mx.array([T - n for n in lens])
        cache = make_cache(model.args)
        mask = prefill_mask(T, pad if T > min(lens) else None)
        logits, hidden, _ = model.forward(x, cache=cache, mask=mask)
        return Prefill(x, pad, cache, logits[:, -1], hidden)

    @staticmethod
    def capacity(T: int, max_tokens: int, extra: int = 0) -> int:
        """Static cache size: whole 256s, so fewer distinct shapes are traced."""
        return -(-(T + max_tokens + extra) // 256) * 256

    # ------------------------------------------------------------------ sampling/greedy
    def decode(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        stats: Stats | None = None,
        compiled: bool = True,
        unpenalised: int | None = None,
    ) -> Iterator[list[int]]:
        """Yield the next token of every prompt (a list of B ids) for up to params.max_tokens
        steps. Prompts of different lengths are left-padded; close the generator to stop early.
        `unpenalised`: a prompt token the penalties ignore (bos, which may double as eos).
        compiled=False runs the step eagerly (same tokens; no JIT compile on first use)."""
        stats = stats if stats is not None else Stats()
        B, V = len(prompts), self.model.args.vocab_size
        tic = time.perf_counter()
        pre = self.prefill(prompts)
        T = pre.x.shape[1]
        counts = None
        if params.penalised:  # prompt tokens count as seen (not the padding or bos)
            real = mx.arange(T)[None] >= pre.pad[:, None]  # [B, T]
            if unpenalised is not None:
                real = real & (pre.x != unpenalised)
            rows = mx.arange(B)[:, None]
            counts = mx.zeros((B, V), mx.float32).at[rows, pre.x].add(real.astype(mx.float32))
        seed = params.seed if params.seed is not None else time.time_ns() % 2**32
        key = mx.random.key(seed)
        sampler = make_sampler(params)
        temps = [mx.array(params.temperature_at(i), mx.float32) for i in range(params.max_tokens)]
        tok, key = sampler(pre.logits, counts, temps[0], key)
        mx.eval(tok, key, [s for c in pre.cache for s in c.state])
        self._count_prompt(stats, prompts, pre.cache, tic)

        capacity = self.capacity(T, params.max_tokens)
        state = [s for c in pre.cache for s in StaticKVCache.from_cache(c, capacity).state]
        penalised = counts is not None
        build = lambda: self._make_step(sampler, len(pre.cache), penalised)  # noqa: E731
        skey = StepKey("decode", _settings(params), penalised)
        step = self.compiled(skey, build) if compiled else build()
        offset = mx.array(T, mx.int32)
        if counts is None:
            counts = mx.zeros((1,))  # placeholder input, unused
        tic, nxt = time.perf_counter(), tok
        try:
            for i in range(params.max_tokens):
                if i + 1 < params.max_tokens:  # queue step i+1 before reading token i
                    nxt, counts, key, offset, *state = step(
                        tok, counts, key, temps[i + 1], offset, pre.pad, *state
                    )
                    mx.async_eval(nxt, counts, key, offset, *state)
                out = tok.tolist()
                stats.generated_tokens += B
                yield out
                tok = nxt
        finally:
            stats.generate_time += time.perf_counter() - tic

    def _make_step(self, sampler: Callable, n_layers: int, penalised: bool) -> Callable:
        """One decode step over fixed-size caches; arrays in, arrays out, so it compiles:
        (token [B], counts, key, temperature, offset, pad [B], *cache arrays)
            -> (next token [B], counts, key, offset + 1, *cache arrays)."""
        model = self.model

        def step(tok, counts, key, temperature, offset, pad, *state):
            caches = static_caches(state, offset, n_layers)
            mask = decode_mask(offset, pad, state[0].shape[2])
            logits = model(tok[:, None], cache=caches, mask=mask)[:, -1]  # [B, V]
            if penalised:
                counts = counts + (tok[:, None] == mx.arange(logits.shape[-1]))
            nxt, key = sampler(logits, counts if penalised else None, temperature, key)
            return (nxt, counts, key, offset + 1, *[s for c in caches for s in c.state])

        return step

    @staticmethod
    def _count_prompt(stats: Stats, prompts: Sequence[Sequence[int]], cache: list, tic: float):
        stats.prompt_tokens += sum(len(p) for p in prompts)
        stats.prompt_time += time.perf_counter() - tic
        stats.cache_numbers_per_token = sum(c.numbers_per_token() for c in cache)
        stats.cache_bytes_per_token = sum(c.nbytes_per_token() for c in cache)

    # --------------------------------------------------------------------- beam search
    def beam_search(
        self,
        prompt: Sequence[int],
        num_beams: int,
        max_tokens: int,
        eos_id: int | None = None,
        length_penalty: float = 1.0,
        early_stopping: bool = False,
        stats: Stats | None = None,
    ) -> BeamResult:
        """Deterministic beam search (Hugging Face semantics); beams are rows of the cache.

        Each step keeps the best num_beams continuations (by summed log-probability); a beam
        that ends in eos among the top num_beams candidates becomes a finished hypothesis,
        scored sum logprob / len ** length_penalty (len = generated tokens). Stops after
        max_tokens, or when num_beams hypotheses are finished and (early_stopping or no live
        beam can beat them).
        """
        N, tic = num_beams, time.perf_counter()

        def score(lp: float, n: int) -> float:
            return lp / n**length_penalty

        pre = self.prefill([prompt])
        cache, logits = pre.cache, pre.logits
        if stats is not None:
            self._count_prompt(stats, [prompt], cache, tic)
        beams: list[tuple[list[int], float]] = [([], 0.0)]  # (tokens, summed logprob)
        finished: list[BeamResult] = []
        done = False
        for t in range(1, max_tokens + 1):
            logits = logits.astype(mx.float32)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # [beams, V]
            cand = (mx.array([lp for _, lp in beams])[:, None] + logp).reshape(-1)
            k = min(2 * N, cand.size)
            top = mx.argpartition(-cand, k - 1)[:k]
            top = top[mx.argsort(-cand[top])]
            V = logp.shape[-1]
            rows, new = [], []
            for rank, (i, lp) in enumerate(zip(top.tolist(), cand[top].tolist())):
                parent, token = divmod(i, V)
                if token == eos_id:
                    if rank < N:  # eos counts only among the top num_beams candidates
                        toks = beams[parent][0] + [token]
                        finished.append(BeamResult(toks, lp, score(lp, t)))
                    continue
                rows.append(parent)
                new.append((beams[parent][0] + [token], lp))
                if len(new) == N:
                    break
            finished = sorted(finished, key=lambda r: -r.score)[:N]
            beams = new
            if len(finished) == N:
                best_live = max(lp for _, lp in beams)
                bound = score(best_live, max_tokens if length_penalty > 0 else t)  # lp only falls
                if early_stopping or bound <= finished[-1].score:
                    done = True
                    break
            if t == max_tokens:
                break
            for c in cache:
                c.reorder(mx.array(rows))
            logits = self.model(mx.array([[b[0][-1]] for b in beams]), cache=cache)[:, -1]
        if not done:
            finished += [BeamResult(toks, lp, score(lp, len(toks))) for toks, lp in beams]
        best = max(finished, key=lambda r: r.score)
        if stats is not None:
            mx.eval([s for c in cache for s in c.state])
            stats.generated_tokens += len(best.tokens)
            stats.generate_time += time.perf_counter() - tic
        return best


@dataclass
class BeamResult:
    tokens: list[int]  # generated ids (ending with eos if it finished)
    logprob: float  # sum of the token log-probabilities
    score: float  # logprob / len ** length_penalty


def static_caches(state: Sequence[mx.array], offset: mx.array, n: int) -> list[StaticKVCache]:
    """n StaticKVCaches over a flat list of their arrays (two per layer) at `offset`."""
    return [StaticKVCache(state[2 * i], state[2 * i + 1], offset) for i in range(n)]


def _settings(params: SamplingParams) -> str:
    """The sampling settings a traced graph depends on (not length, seed or stop strings)."""
    return repr(replace(params, max_tokens=0, seed=None, stop=[]))
