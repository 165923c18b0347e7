"""Choosing tokens: sampling (pure functions on logits [B, V], composed by `make_sampler`) and
beam search (over any model callable with a reorderable cache).

Sampling order (as in Hugging Face): penalties on the raw logits, then temperature, then the
top-k, top-p and min-p filters (each sees the distribution the previous one left), then a draw.
Filters set removed tokens to -inf. Temperature 0 is greedy (argmax of the penalised logits).
`SamplingParams.validate()` raises SamplingError (one line) on a nonsensical value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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


# ------------------------------------------------------------------------- beam search
@dataclass
class BeamResult:
    tokens: list[int]  # generated ids (ending with eos if it finished)
    logprob: float  # sum of the token log-probabilities
    score: float  # logprob / len ** length_penalty


def beam_search(
    model: Callable,
    cache: list,
    prompt: Sequence[int],
    num_beams: int,
    max_tokens: int,
    eos_id: int | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
) -> BeamResult:
    """Deterministic beam search (Hugging Face semantics) over any `model(ids [B, T], cache=cache)
    -> logits [B, T, V]` whose cache is a list of objects with `reorder(rows)`.

    Each step keeps the best num_beams continuations (by summed log-probability); a beam that
    ends in eos among the top num_beams candidates becomes a finished hypothesis, scored
    sum logprob / len ** length_penalty (len = generated tokens). Stops after max_tokens, or
    when num_beams hypotheses are finished and (early_stopping or no live beam can beat them).
    """
    N = num_beams

    def score(lp: float, n: int) -> float:
        return lp / n**length_penalty

    logits = model(mx.array([list(prompt)]), cache=cache)[:, -1]
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
        logits = model(mx.array([[b[0][-1]] for b in beams]), cache=cache)[:, -1]
    if not done:
        finished += [BeamResult(toks, lp, score(lp, len(toks))) for toks, lp in beams]
    return max(finished, key=lambda r: r.score)
