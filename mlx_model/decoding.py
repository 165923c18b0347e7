"""Token-level decoding: prefill, then a compiled one-token step over fixed-size caches.

The prompt (left-padded when several decode together) runs through the model at once, filling a
per-layer KVCache (MLA: the latent + shared rope key; MQA: one K/V head). The cache is then
copied into fixed-size buffers (StaticKVCache) so that one mx.compile'd step, with the cache
arrays as its inputs and outputs, serves every position; pad keys are masked in both phases.
The step is kept on the model (cached_step), so later calls start at full speed.
Text, stop strings, beam search and the CLI are in mlx_model/generate.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx

from .cache import StaticKVCache, make_cache
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

    def report(self) -> str:
        pt = f"{self.prompt_tokens / self.prompt_time:.1f}" if self.prompt_time else "-"
        gt = self.generated_tokens / max(self.generate_time, 1e-9)
        return (
            f"prompt: {self.prompt_tokens} tokens, {pt} tokens/s | "
            f"generation: {self.generated_tokens} tokens, {gt:.1f} tokens/s | "
            f"cache: {self.cache_numbers_per_token} numbers = {self.cache_bytes_per_token} bytes per token"
        )


# ------------------------------------------------------------------------------ masks
def prefill_mask(T: int, pad: mx.array | None) -> Any:
    """Causal mask hiding left padding (pad queries see themselves, so no row is empty)."""
    return attention_mask(T, 0, pad)


def decode_mask(offset: mx.array, pad: mx.array, S: int) -> mx.array:
    """[B, 1, 1, S]: keys written so far (<= offset) and not padding."""
    keys = mx.arange(S)
    return ((keys <= offset)[None] & (keys[None] >= pad[:, None]))[:, None, None, :]


# ---------------------------------------------------------------------------- sampling
def decode(
    model: Any,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    stats: Stats | None = None,
    compiled: bool = True,
    unpenalised: int | None = None,
) -> Iterator[list[int]]:
    """Yield the next token of every prompt (a list of B ids) for up to params.max_tokens steps.

    Prompts of different lengths are left-padded; close the generator to stop early.
    `unpenalised`: a prompt token the penalties ignore (bos, which may double as eos).
    """
    stats = stats if stats is not None else Stats()
    B, lens = len(prompts), [len(p) for p in prompts]
    T, V = max(lens), model.args.vocab_size
    tic = time.perf_counter()
    x = mx.array([[0] * (T - n) + list(p) for n, p in zip(lens, prompts)])  # [B, T]
    pad = mx.array([T - n for n in lens])
    cache = make_cache(model.args)
    logits = model(x, cache=cache, mask=prefill_mask(T, pad if T > min(lens) else None))[:, -1]
    counts = None
    if params.penalised:  # prompt tokens count as seen (not the padding or bos)
        real = mx.arange(T)[None] >= pad[:, None]  # [B, T]
        if unpenalised is not None:
            real = real & (x != unpenalised)
        rows = mx.arange(B)[:, None]
        counts = mx.zeros((B, V), mx.float32).at[rows, x].add(real.astype(mx.float32))  # [B, V]
    seed = params.seed if params.seed is not None else time.time_ns() % 2**32
    key = mx.random.key(seed)
    sampler = make_sampler(params)
    temps = [mx.array(params.temperature_at(i), mx.float32) for i in range(params.max_tokens)]
    tok, key = sampler(logits, counts, temps[0], key)
    state = [s for c in cache for s in c.state]
    mx.eval(tok, key, state)
    stats.prompt_tokens += sum(lens)
    stats.prompt_time += time.perf_counter() - tic
    stats.cache_numbers_per_token = sum(c.numbers_per_token() for c in cache)
    stats.cache_bytes_per_token = sum(c.nbytes_per_token() for c in cache)

    capacity = (
        -(-(T + params.max_tokens) // 256) * 256
    )  # whole 256s: fewer distinct shapes to trace
    state = [s for c in cache for s in StaticKVCache.from_cache(c, capacity).state]
    step = cached_step(model, params, sampler, len(cache), counts is not None, compiled)
    offset = mx.array(T, mx.int32)
    if counts is None:
        counts = mx.zeros((1,))  # placeholder input, unused
    tic, nxt = time.perf_counter(), tok
    try:
        for i in range(params.max_tokens):
            if i + 1 < params.max_tokens:  # queue step i+1 before reading token i
                nxt, counts, key, offset, *state = step(
                    tok, counts, key, temps[i + 1], offset, pad, *state
                )
                mx.async_eval(nxt, counts, key, offset, *state)
            out = tok.tolist()
            stats.generated_tokens += B
            yield out
            tok = nxt
    finally:
        stats.generate_time += time.perf_counter() - tic


class _StepCache:
    """Compiled decode steps of one model, keyed by sampling settings (a plain object, so that
    nn.Module keeps it out of the parameter tree), each with the weights it was traced with."""

    def __init__(self) -> None:
        self.steps: dict[str, tuple[tuple, Callable]] = {}


def cached_step(
    model: Any,
    params: SamplingParams,
    sampler: Callable,
    n_layers: int,
    penalised: bool,
    compiled: bool = True,
) -> Callable:
    """make_step, reused by later calls with the same model and sampler settings.

    Each mx.compile'd function object is traced on its first call (~0.5 s for a small model,
    several ms per generated token over a short generation); keeping the step on the model
    makes every later generate call start at full speed. The trace holds the weights as
    constants, so a step is reused only while the model still has the very same weight arrays
    (MLX arrays are immutable: training or loading replaces them, and that re-traces).
    """
    if not compiled:
        return make_step(model, sampler, n_layers, penalised, compiled)
    from mlx.utils import tree_flatten

    cache = model.__dict__.get("_decode_steps")
    if cache is None:
        cache = _StepCache()
        object.__setattr__(model, "_decode_steps", cache)
    key = repr((n_layers, penalised, replace(params, max_tokens=0, seed=None, stop=[])))
    weights = tuple(id(a) for _, a in tree_flatten(model.parameters()))
    hit = cache.steps.get(key)
    if hit is None or hit[0] != weights:
        hit = cache.steps[key] = (weights, make_step(model, sampler, n_layers, penalised, compiled))
    return hit[1]


def make_step(
    model: Any, sampler: Callable, n_layers: int, penalised: bool, compiled: bool = True
) -> Callable:
    """One decode step over fixed-size caches; arrays in, arrays out, so it can be compiled:
    (token [B], counts, key, temperature, offset, pad [B], *cache arrays)
        -> (next token [B], counts, key, offset + 1, *cache arrays)."""

    def step(tok, counts, key, temperature, offset, pad, *state):
        caches = [StaticKVCache(state[2 * i], state[2 * i + 1], offset) for i in range(n_layers)]
        mask = decode_mask(offset, pad, state[0].shape[2])
        logits = model(tok[:, None], cache=caches, mask=mask)[:, -1]  # [B, V]
        if penalised:
            counts = counts + (tok[:, None] == mx.arange(logits.shape[-1]))
        nxt, key = sampler(logits, counts if penalised else None, temperature, key)
        return (nxt, counts, key, offset + 1, *[s for c in caches for s in c.state])

    return mx.compile(step) if compiled else step
