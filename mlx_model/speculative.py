"""Speculative decoding: a cheap drafter proposes N tokens, the model verifies them in one pass.

Each verification step (one compiled function, fixed shapes, no host round trip inside):
1. the drafter proposes d_1..d_N, drawn from its own (filtered) distributions q_1..q_N;
2. the model runs [c, d_1..d_N] (c: the last accepted token) over its static latent cache at
   positions m..m+N in one forward pass, giving p_1..p_{N+1};
3. `sampling.speculative_accept` keeps the longest prefix the model agrees with (greedy: d_j ==
   argmax p_j; sampling: the standard rule, accept d_j with probability min(1, p_j/q_j), on
   rejection draw from norm(max(0, p_j - q_j)), after N acceptances draw a bonus from p_{N+1}),
   so greedy output is the model's own greedy output and sampled output has its distribution;
4. rollback: the cache offset moves to m + a + 1 (a accepted drafts + one corrected token).
   Entries past it are masked by `decode_mask` (keys <= offset) and overwritten next step.
Rows of a batch keep the same number of tokens per step (the smallest count over the rows; a
row that accepted more keeps its next accepted draft as its last token), so one offset serves
all rows and the step stays one static graph; the output is still exact per row.

Drafters:
- `MTPDrafter` (self-speculative, DeepSeek-V3 section 5.4.3): the first MTP module, with its own
  static cache, predicts t_{i+2} from the main model's hidden state at i and token t_{i+1}. For
  N > 1 it is chained: its own output hidden state stands in for the main model's at the next
  position (deeper MTP modules, when trained, are not used). After verification the module
  re-reads the verified positions with the model's true hidden states, which also gives d_1 of
  the next step: all N+1 positions enter its cache (one fixed shape), but only the last kept
  one runs through attention's query, the MoE and the lm_head (`at`).
- `ModelDrafter`: a smaller checkpoint with the same tokenizer, decoding N tokens ahead with its
  own static cache; it re-reads the last two positions at the start of each step, so a fully
  accepted step needs no extra pass.
Penalties and temperature schedules would make p depend on the position inside the draft; they
are refused (SpeculativeError), as is beam search.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .cache import StaticKVCache
from .engine import Engine, Prefill, Stats, StepKey, _settings, decode_mask, static_caches
from .model import attention_mask
from .sampling import SamplingParams, process_logits, speculative_accept


class SpeculativeError(ValueError):
    """Speculative decoding asked of a model or setting that cannot do it (one line, a fix)."""


@dataclass
class Speculative:
    """How to draft: kind "mtp" (the model's MTP modules) or "draft" (draft_model)."""

    kind: str = "mtp"
    num_draft: int = 1
    draft_model: Any = None

    def check(self, model: Any, params: SamplingParams) -> None:
        """Raise SpeculativeError when this drafter cannot serve `model` with `params`."""
        if not (isinstance(self.num_draft, int) and self.num_draft >= 1):
            raise SpeculativeError(f"--num-draft {self.num_draft}: must be an integer >= 1")
        if self.kind not in ("mtp", "draft"):
            raise SpeculativeError(f"--speculative {self.kind}: choose mtp (or --draft-model)")
        if self.kind == "mtp" and not getattr(model, "mtp", None):
            raise SpeculativeError(
                "--speculative mtp: the checkpoint has no MTP weights (mtp.safetensors); train "
                "with --num-nextn-predict-layers 1 or use --draft-model"
            )
        if self.kind == "draft":
            if self.draft_model is None:
                raise SpeculativeError("speculative kind 'draft' needs a draft model")
            if self.draft_model.args.vocab_size != model.args.vocab_size:
                raise SpeculativeError(
                    f"--draft-model: vocabulary of {self.draft_model.args.vocab_size} tokens, "
                    f"the model has {model.args.vocab_size}: use a draft with the same tokenizer"
                )
        for flag, on in (
            ("repetition/presence/frequency penalties", params.penalised),
            ("--temperature-end", params.temperature_end is not None),
            ("--num-beams", params.num_beams > 1),
        ):
            if on:
                raise SpeculativeError(
                    f"{flag} with speculative decoding: not supported (the draft distribution "
                    "would change inside a step); drop it or decode without speculation"
                )

    @staticmethod
    def check_tokenizers(tok: Any, draft_tok: Any, where: str) -> None:
        """The draft model must share the model's tokenizer (same ids for the same text)."""
        same = (
            tok.vocab_size == draft_tok.vocab_size
            and tok.bos_id == draft_tok.bos_id
            and tok.eos_id == draft_tok.eos_id
            and tok.fingerprint() == draft_tok.fingerprint()
        )
        if not same:
            raise SpeculativeError(
                f"--draft-model {where}: its tokenizer differs from the model's; "
                "use a draft model trained with the same tokenizer"
            )


# ----------------------------------------------------------------------------- drawing
def draw(
    logits: mx.array, params: SamplingParams, temperature: mx.array, key: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """logits [..., V] -> (token [...], the processed logits it was drawn from, next key)."""
    logits = logits.astype(mx.float32)
    if params.greedy:
        return mx.argmax(logits, axis=-1), logits, key
    key, sub = mx.random.split(key)
    proc = process_logits(logits, None, params, temperature)
    return mx.random.categorical(proc, key=sub), proc, key


class MTPDrafter:
    """Drafts with MTP module 0; state: d_1 [B], its logits [B, V], its hidden [B, D], cache."""

    def __init__(self, model: Any, n: int, params: SamplingParams):
        self.model, self.n, self.params = model, n, params

    def start(self, pre: Prefill, c: mx.array, temp, key, capacity: int) -> tuple[list, Any]:
        from .cache import KVCache

        cache = KVCache()
        tokens = mx.concatenate([pre.x[:, 1:], c[:, None]], axis=1)  # t_{i+1} beside h_i
        mask = attention_mask(pre.x.shape[1], 0, pre.pad)
        logits, h, _ = self.model.mtp_block(0, pre.hidden, tokens, cache, mask)
        d1, q1, key = draw(logits[:, -1], self.params, temp, key)
        static = StaticKVCache.from_cache(cache, capacity)
        return [d1, q1, h[:, -1], *static.state], key

    def propose(self, c, offset, pad, temp, key, state):
        d, q, h, *cache = state
        drafts, qs = [d], [q]
        for j in range(1, self.n):  # chain: the module's own hidden stands in for the model's
            pos = offset + j - 1
            caches = static_caches(cache, pos, 1)
            mask = decode_mask(pos, pad, cache[0].shape[2])
            logits, hh, _ = self.model.mtp_block(0, h[:, None], d[:, None], caches[0], mask)
            d, q, key = draw(logits[:, -1], self.params, temp, key)
            h = hh[:, -1]
            drafts.append(d)
            qs.append(q)
            cache = caches[0].state
        return drafts, qs, key, cache

    def advance(self, c, out, a, hidden, offset, pad, temp, key, cache):
        """Re-read positions offset..offset+N with the model's hidden states and the accepted
        tokens (only offset..offset+a are kept); its output at offset+a drafts the next d_1."""
        caches = static_caches(cache, offset, 1)
        mask = decode_mask(offset + a, pad, cache[0].shape[2])  # the query at offset + a
        logits, h, _ = self.model.mtp_block(0, hidden, out, caches[0], mask, at=a)
        d1, q1, key = draw(logits[:, 0], self.params, temp, key)
        return [d1, q1, h[:, 0], *caches[0].state], key


class ModelDrafter:
    """Drafts with a smaller model; state: the token before c [B], the draft model's cache."""

    def __init__(self, draft: Any, n: int, params: SamplingParams):
        self.model, self.n, self.params = draft, n, params
        self.layers = draft.args.num_hidden_layers

    def start(self, pre: Prefill, c, temp, key, capacity: int, engine: Engine, prompts):
        dpre = engine.prefill(prompts, model=self.model)
        state = [s for k in dpre.cache for s in StaticKVCache.from_cache(k, capacity).state]
        return [pre.x[:, -1], *state], key

    def propose(self, c, offset, pad, temp, key, state):
        prev, *cache = state
        S = cache[0].shape[2]
        x = mx.stack([prev, c], axis=1)  # positions offset-1, offset: re-read the last one
        pos = offset - 1
        drafts, qs = [], []
        for _ in range(self.n):
            caches = static_caches(cache, pos, self.layers)
            mask = decode_mask(pos, pad, S, x.shape[1])
            logits = self.model(x, cache=caches, mask=mask)[:, -1]
            d, q, key = draw(logits, self.params, temp, key)
            drafts.append(d)
            qs.append(q)
            cache = [s for k in caches for s in k.state]
            pos, x = pos + x.shape[1], d[:, None]
        return drafts, qs, key, cache

    def advance(self, c, out, a, hidden, offset, pad, temp, key, cache):
        prev = _pick(mx.concatenate([c[:, None], out], axis=1), a)  # token at offset + a
        return [prev, *cache], key


def _pick(x: mx.array, a: mx.array) -> mx.array:
    """x[:, a] for a scalar array a (x: [B, L, ...])."""
    return mx.take(x, a, axis=1)


# ------------------------------------------------------------------------------ a step
def make_round(model: Any, drafter: Any, params: SamplingParams, n_layers: int) -> Callable:
    """One verification step, arrays in and out (so it compiles):
    (c [B], key, temperature, offset, pad [B], *model cache, *drafter state)
        -> (tokens [B, N+1], kept [], c', key, offset', *model cache, *drafter state);
    the first `kept` tokens of every row are new output, c' (= tokens[:, kept - 1]) is next."""
    N = drafter.n

    def round_(c, key, temp, offset, pad, *state):
        main, dstate = state[: 2 * n_layers], list(state[2 * n_layers :])
        drafts, qs, key, dcache = drafter.propose(c, offset, pad, temp, key, dstate)
        d = mx.stack(drafts, axis=1)  # [B, N]
        caches = static_caches(main, offset, n_layers)
        mask = decode_mask(offset, pad, main[0].shape[2], N + 1)
        logits, hidden, _ = model.forward(mx.concatenate([c[:, None], d], 1), caches, mask)
        p = logits.astype(mx.float32)
        if not params.greedy:
            p = process_logits(p, None, params, temp)
        key, sub = mx.random.split(key)
        n, corr = speculative_accept(p, mx.stack(qs, axis=1), d, params.greedy, sub)
        a = n.min()  # tokens kept by every row: a drafts + one more
        ext = mx.concatenate([d, corr[:, None]], axis=1)  # [B, N+1]
        last = mx.where(n > a, _pick(ext, a), corr)  # row accepted more: its next draft
        out = mx.where(mx.arange(N + 1) == a, last[:, None], ext)
        dstate, key = drafter.advance(c, out, a, hidden, offset, pad, temp, key, dcache)
        new_main = [s for k in caches for s in k.state]
        return (out, a + 1, last, key, offset + a + 1, *new_main, *dstate)

    return round_


def run(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    num_draft: int,
    draft_model: Any = None,
    stats: Stats | None = None,
    compiled: bool = True,
) -> Iterator[list[list[int]]]:
    """Engine.speculative: yield the new tokens of every row after each verification step."""
    model = engine.model
    Speculative("mtp" if draft_model is None else "draft", num_draft, draft_model).check(
        model, params
    )
    stats = stats if stats is not None else Stats()
    B, N = len(prompts), num_draft
    tic = time.perf_counter()
    seed = params.seed if params.seed is not None else time.time_ns() % 2**32
    key, temp = mx.random.key(seed), mx.array(params.temperature, mx.float32)
    pre = engine.prefill(prompts)
    c, _, key = draw(pre.logits, params, temp, key)  # the first token, as in plain decoding
    T = pre.x.shape[1]
    capacity = engine.capacity(T, params.max_tokens, 2 * (N + 1))
    main = [s for k in pre.cache for s in StaticKVCache.from_cache(k, capacity).state]
    if draft_model is None:
        drafter: Any = MTPDrafter(model, N, params)
        dstate, key = drafter.start(pre, c, temp, key, capacity)
        kind, ident = "mtp", 0
    else:
        drafter = ModelDrafter(draft_model, N, params)
        dstate, key = drafter.start(pre, c, temp, key, capacity, engine, prompts)
        kind, ident = "draft", id(draft_model)
    mx.eval(c, key, main, dstate)
    engine._count_prompt(stats, prompts, pre.cache, tic)

    n_layers = len(pre.cache)
    build = lambda: make_round(model, drafter, params, n_layers)  # noqa: E731
    skey = StepKey(f"{kind}:{ident}", _settings(params), False, N)
    round_ = engine.compiled(skey, build) if compiled else build()
    offset = mx.array(T, mx.int32)
    tic, done = time.perf_counter(), 0
    try:
        stats.generated_tokens += B
        done += 1
        yield [[t] for t in c.tolist()]
        res = round_(c, key, temp, offset, pre.pad, *main, *dstate)
        mx.async_eval(res)
        while done < params.max_tokens:
            out, kept, c, key, offset, *state = res
            if done + 1 < params.max_tokens:  # queue the next step before reading this one
                res = round_(c, key, temp, offset, pre.pad, *state)
                mx.async_eval(res)
            k = min(kept.item(), params.max_tokens - done)
            stats.verify_steps += 1
            stats.drafted += N
            stats.accepted += kept.item() - 1
            stats.generated_tokens += B * k
            done += k
            yield [row[:k] for row in out.tolist()]
    finally:
        stats.generate_time += time.perf_counter() - tic
