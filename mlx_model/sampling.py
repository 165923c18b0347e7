"""Choosing tokens: pure functions on logits [B, V] (or [B, L, V]), composed by `make_sampler`,
and the speculative accept/reject rule. They know nothing of the model: decoding strategies
(beam search, speculative decoding) are mlx_model/engine.py and mlx_model/speculative.py.

Sampling order (as in Hugging Face): penalties on the raw logits, then temperature, then the
top-k, top-p and min-p filters (each sees the distribution the previous one left), then a draw.
Filters set removed tokens to -inf. Temperature 0 is greedy (argmax of the penalised logits).
`SamplingParams.validate()` raises SamplingError (one line) on a nonsensical value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

NEG_INF = float("-inf")


class SamplingError(ValueError):
    """A nonsensical sampling setting; the message is one line naming the flag."""


@dataclass
class SamplingParams:
    """Decoding settings, shared by the CLI (`--kebab-case` flags) and `generate(**kw)`."""

    max_tokens: int = 100  # new tokens per prompt
    temperature: float = 0.7  # 0 = greedy
    temperature_end: float | None = None  # linear schedule to this value (None = constant)
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    top_p: float = 0.9  # keep the smallest set with probability >= p (1 = off)
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max (0 = off)
    repetition_penalty: float = 1.0  # CTRL: seen logits / rp if > 0 else * rp (1 = off)
    presence_penalty: float = 0.0  # OpenAI: minus this once for every seen token
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count
    seed: int | None = None  # random seed (None = fresh randomness)
    stop: list[str] = field(default_factory=list)  # stop strings (output cut before them)
    num_beams: int = 1  # > 1: beam search (deterministic, no sampling)
    length_penalty: float = 1.0  # beam score = sum logprob / len ** length_penalty
    early_stopping: bool = False  # beam search stops once num_beams hypotheses finished

    def validate(self) -> SamplingParams:
        def bad(flag: str, why: str) -> None:
            v = getattr(self, flag)
            raise SamplingError(f"--{flag.replace('_', '-')} {v}: {why}")

        def finite(x: float) -> bool:
            return isinstance(x, (int, float)) and math.isfinite(x)

        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            bad("max_tokens", "must be an integer >= 1")
        for flag in ("temperature", "temperature_end"):
            v = getattr(self, flag)
            if v is not None and not (finite(v) and v >= 0):
                bad(flag, "must be >= 0 (0 = greedy)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            bad("top_k", "must be an integer >= 0 (0 = off)")
        if not (finite(self.top_p) and 0 < self.top_p <= 1):
            bad("top_p", "must be in (0, 1] (1 = off)")
        if not (finite(self.min_p) and 0 <= self.min_p < 1):
            bad("min_p", "must be in [0, 1) (0 = off)")
        if not (finite(self.repetition_penalty) and self.repetition_penalty > 0):
            bad("repetition_penalty", "must be > 0 (1 = off)")
        for flag in ("presence_penalty", "frequency_penalty", "length_penalty"):
            if not finite(getattr(self, flag)):
                bad(flag, "must be a finite number")
        if not (isinstance(self.num_beams, int) and self.num_beams >= 1):
            bad("num_beams", "must be an integer >= 1 (1 = no beam search)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError("--stop: stop strings must be non-empty")
        return self

    def temperature_at(self, step: int) -> float:
        """Temperature of new token `step` (0-based): linear from temperature to temperature_end."""
        end = self.temperature if self.temperature_end is None else self.temperature_end
        if self.max_tokens <= 1:
            return self.temperature
        return self.temperature + (end - self.temperature) * step / (self.max_tokens - 1)

    @property
    def greedy(self) -> bool:
        """Every step is an argmax (temperature 0 throughout)."""
        return self.temperature == 0 and not self.temperature_end

    @property
    def penalised(self) -> bool:
        return (
            self.repetition_penalty != 1
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
        )


# --------------------------------------------------------------------------- logit processors
def repetition_penalty(logits: mx.array, counts: mx.array, penalty: float) -> mx.array:
    """CTRL penalty on tokens with counts > 0: positive logits / penalty, negative * penalty."""
    scaled = mx.where(logits > 0, logits / penalty, logits * penalty)
    return mx.where(counts > 0, scaled, logits)


def presence_frequency_penalty(
    logits: mx.array, counts: mx.array, presence: float, frequency: float
) -> mx.array:
    """OpenAI: logits - presence * [count > 0] - frequency * count."""
    return (
        logits
        - presence * (counts > 0).astype(logits.dtype)
        - frequency * counts.astype(logits.dtype)
    )


def top_k_filter(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest logits of each row (0 or k >= V: keep all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = mx.topk(logits, k, axis=-1).min(axis=-1, keepdims=True)  # [B, 1]
    return mx.where(logits >= kth, logits, NEG_INF)


def top_p_filter(logits: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability sums to >= p."""
    if p >= 1.0:
        return logits
    probs = mx.softmax(logits, axis=-1)
    sorted_probs = -mx.sort(-probs, axis=-1)  # descending
    before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the more likely tokens
    kept = mx.where(before < p, sorted_probs, mx.inf)
    threshold = kept.min(axis=-1, keepdims=True)  # smallest kept probability
    return mx.where(probs >= threshold, logits, NEG_INF)


def min_p_filter(logits: mx.array, min_p: float) -> mx.array:
    """Keep tokens with probability >= min_p * the top probability (in log space)."""
    if min_p <= 0:
        return logits
    top = logits.max(axis=-1, keepdims=True)
    return mx.where(logits >= top + math.log(min_p), logits, NEG_INF)


def process_logits(
    logits: mx.array,
    counts: mx.array | None,
    params: SamplingParams,
    temperature: mx.array | float,
) -> mx.array:
    """Penalties, temperature and filters; returns the logits a categorical draw uses."""
    logits = penalise(logits, counts, params)
    logits = logits / mx.maximum(temperature, 1e-6)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def penalise(logits: mx.array, counts: mx.array | None, params: SamplingParams) -> mx.array:
    """The repetition / presence / frequency penalties (identity when all are off)."""
    if counts is None or not params.penalised:
        return logits
    if params.repetition_penalty != 1:
        logits = repetition_penalty(logits, counts, params.repetition_penalty)
    if params.presence_penalty or params.frequency_penalty:
        logits = presence_frequency_penalty(
            logits, counts, params.presence_penalty, params.frequency_penalty
        )
    return logits


Sampler = Callable[[mx.array, mx.array | None, mx.array, mx.array], tuple[mx.array, mx.array]]


def make_sampler(params: SamplingParams) -> Sampler:
    """(logits [B, V], counts [B, V] or None, temperature [], key) -> (tokens [B], next key).

    Pure array code, so it can run inside an mx.compile'd decode step.
    """
    greedy = params.greedy

    def sample(logits, counts, temperature, key):
        logits = logits.astype(mx.float32)
        if greedy:
            return mx.argmax(penalise(logits, counts, params), axis=-1), key
        key, sub = mx.random.split(key)
        drawn = mx.random.categorical(process_logits(logits, counts, params, temperature), key=sub)
        best = mx.argmax(penalise(logits, counts, params), axis=-1)
        return mx.where(temperature > 0, drawn, best), key  # a schedule may pass through 0

    return sample


# -------------------------------------------------------------------- speculative rule
def speculative_accept(
    p_logits: mx.array, q_logits: mx.array, drafts: mx.array, greedy: bool, key: mx.array
) -> tuple[mx.array, mx.array]:
    """How many drafts the model keeps, and the token after them (Leviathan et al. 2023).

    p_logits [B, N+1, V]: the model's (processed) logits at the N draft positions and one
    after; q_logits [B, N, V]: the drafter's processed logits the drafts [B, N] were drawn
    from. Greedy: keep while draft == argmax p; the next token is argmax p there. Sampling:
    accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection draw from
    norm(max(0, p_j - q_j)); after N acceptances draw from p_{N+1}. Each kept token then has
    exactly the model's distribution. Returns (kept [B] int32 in 0..N, next token [B]).
    """
    B, N = drafts.shape
    if greedy:
        best = mx.argmax(p_logits, axis=-1)  # [B, N+1]
        ok = (best[:, :N] == drafts).astype(mx.int32)
        kept = mx.cumprod(ok, axis=1).sum(axis=1)
        return kept, mx.take_along_axis(best, kept[:, None], axis=1)[:, 0]
    p = mx.softmax(p_logits.astype(mx.float32), axis=-1)
    q = mx.softmax(q_logits.astype(mx.float32), axis=-1)
    pd = mx.take_along_axis(p[:, :N], drafts[..., None], axis=-1)[..., 0]  # [B, N]
    qd = mx.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    k_accept, k_draw = mx.random.split(key)
    u = mx.random.uniform(shape=(B, N), key=k_accept)
    kept = mx.cumprod((u * qd < pd).astype(mx.int32), axis=1).sum(axis=1)  # [B]
    at = kept[:, None, None]
    p_at = mx.take_along_axis(p, at, axis=1)[:, 0]  # [B, V]
    q_at = mx.take_along_axis(mx.concatenate([q, mx.zeros_like(q[:, :1])], 1), at, axis=1)[:, 0]
    resid = mx.maximum(p_at - q_at, 0.0)
    resid = mx.where(resid.sum(-1, keepdims=True) > 0, resid, p_at)  # p == q: never rejected
    return kept, mx.random.categorical(mx.log(resid), key=k_draw)
