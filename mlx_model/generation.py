"""Text generation: load a checkpoint, turn prompts into ids, decode, turn ids back into text.

    from mlx_model import load, generate
    model, tokenizer = load("weights/deepseek-small")
    print(generate(model, tokenizer, "The", max_tokens=32, temperature=0))

Decoding itself (prefill, compiled steps, beam search, speculative decoding) is
`mlx_model.engine.Engine`; this module adds detokenization with streaming and stop strings.
Pass an Engine instead of a model to reuse its compiled steps across calls. The command line
is `python -m mlx_model.generate` (mlx_model/generate.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from .checkpoint import load_model, require_dir
from .data import Tokenizer
from .engine import Engine, Stats
from .quantize import (
    check_quantization,
    is_quantized_dir,
    load_quantized,
    quantize_model,
    read_config,
)
from .sampling import SamplingParams
from .speculative import Speculative
from .speculative import run as run_speculative


class GenerateError(ValueError):
    """Bad generation input (prompt, tokenizer); the message is one line naming the fix."""


# ----------------------------------------------------------------------------- loading
def load(path: str, quantize: int | None = None, group_size: int = 64) -> tuple[Any, Tokenizer]:
    """(model, tokenizer) from a checkpoint directory (ours, Hugging Face deepseek_v3, or
    mlx-lm's quantized one); quantize=4|8 quantizes the weights on load."""
    require_dir(path)
    if quantize is not None:
        check_quantization(quantize, group_size)
    if is_quantized_dir(read_config(path)):
        if quantize is not None:
            raise GenerateError(f"{path} is quantized already: drop --quantize")
        model = load_quantized(path)
    else:
        model = load_model(path)
    if quantize is not None:
        quantize_model(model, quantize, group_size)
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise GenerateError(
            f"the tokenizer in {path} has {tokenizer.vocab_size} tokens but the model only "
            f"{model.args.vocab_size}: they do not belong together"
        )
    model.eval()  # capacity dropping is training-only
    return model, tokenizer


def as_engine(model: Any) -> Engine:
    """An Engine for a model (or the Engine itself)."""
    return model if isinstance(model, Engine) else Engine(model)


def encode_prompt(
    tokenizer: Tokenizer, prompt: str, window: int, max_tokens: int, truncate: bool
) -> list[int]:
    """bos (if the tokenizer has one) + prompt ids, checked against the context window."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise GenerateError("empty prompt: give some text to continue")
    if tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id] + ids
    if len(ids) >= window:
        if not truncate:
            raise GenerateError(
                f"the prompt has {len(ids)} tokens but the context window is {window}: "
                "shorten it or pass --truncate-prompt"
            )
        ids = ids[-max(1, window - max_tokens) :]  # keep the end, leave room to generate
    return ids


# -------------------------------------------------------------------------- text level
@dataclass
class _Row:
    """Detokenization state of one prompt: committed text + ids since the last newline."""

    base: str = ""
    seg: list[int] = field(default_factory=list)
    sent: int = 0  # characters already handed out
    text: str = ""
    done: bool = False


def _push(row: _Row, token: int, tokenizer: Tokenizer, stops: list[str], resegment: bool) -> str:
    """Add one token to a row; return the new text safe to show (none past a stop string)."""
    if token == tokenizer.eos_id:
        row.done = True
        return _flush(row)
    row.seg.append(token)
    seg_text = tokenizer.decode(row.seg)
    row.text = row.base + seg_text
    if resegment and seg_text.endswith("\n"):  # byte-level BPE decodes pieces independently
        row.base, row.seg = row.text, []
    hits = [i for i in (row.text.find(s, max(0, row.sent - len(s))) for s in stops) if i >= 0]
    if hits:
        row.text, row.done = row.text[: min(hits)], True
        return _flush(row)
    safe = len(row.text.rstrip("\ufffd"))  # an incomplete UTF-8 character
    for s in stops:  # hold back a possible start of a stop string
        for n in range(min(len(s) - 1, safe), 0, -1):
            if row.text[:safe].endswith(s[:n]):
                safe -= n
                break
    out, row.sent = row.text[row.sent : max(safe, row.sent)], max(safe, row.sent)
    return out


def _flush(row: _Row) -> str:
    out, row.sent = row.text[row.sent :], len(row.text)
    return out


def stream(
    model: Any,
    tokenizer: Tokenizer,
    prompts: list[str],
    params: SamplingParams,
    stats: Stats | None = None,
    truncate_prompt: bool = False,
    compiled: bool = True,
    speculative: Speculative | None = None,
) -> Iterator[tuple[int, str]]:
    """Yield (prompt index, new text) as tokens arrive; all prompts decode together.

    `model`: a Model or an Engine. Stops at eos, a stop string (the text is cut before it) or
    max_tokens new tokens. compiled=False runs the decode step eagerly (same tokens; no JIT
    compile on first use). `speculative`: draft-and-verify decoding (same output distribution).
    """
    params.validate()
    engine = as_engine(model)
    stats = stats if stats is not None else Stats()
    window = engine.model.args.max_position_embeddings
    ids = [encode_prompt(tokenizer, p, window, params.max_tokens, truncate_prompt) for p in prompts]
    room = window - max(len(i) for i in ids)
    if room < params.max_tokens:  # never run past the trained positions
        params = replace(params, max_tokens=room)
    resegment = not tokenizer.is_sentencepiece
    if params.num_beams > 1:
        for r, p in enumerate(ids):
            res = engine.beam_search(
                p,
                params.num_beams,
                params.max_tokens,
                eos_id=tokenizer.eos_id,
                length_penalty=params.length_penalty,
                early_stopping=params.early_stopping,
                stats=stats,
            )
            row, text = _Row(), ""
            for t in res.tokens:
                text += _push(row, t, tokenizer, params.stop, resegment)
                if row.done:
                    break
            yield r, text + _flush(row)
        return
    rows = [_Row() for _ in ids]
    if speculative is not None:
        speculative.check(engine.model, params)
        steps = run_speculative(
            engine, ids, params, speculative.num_draft, speculative.draft_model, stats, compiled
        )
        gen = (col for block in steps for col in zip(*block))  # one token per row at a time
    else:
        gen = engine.decode(ids, params, stats, compiled, unpenalised=tokenizer.bos_id)
    try:
        for tokens in gen:
            for r, (row, t) in enumerate(zip(rows, tokens)):
                if not row.done:
                    delta = _push(row, t, tokenizer, params.stop, resegment)
                    if delta:
                        yield r, delta
            if all(row.done for row in rows):
                break
        for r, row in enumerate(rows):
            if row.sent < len(row.text):
                yield r, _flush(row)
    finally:
        gen.close()


def generate(
    model: Any,
    tokenizer: Tokenizer,
    prompt: str | list[str],
    verbose: bool = False,
    truncate_prompt: bool = False,
    compiled: bool = True,
    speculative: str | None = None,
    num_draft: int = 1,
    draft_model: Any = None,
    **sampling: Any,
) -> str | list[str]:
    """Continuation of `prompt` (or a list of continuations for a list of prompts).

    `model`: a Model, or an Engine (reuses its compiled steps across calls).
    `sampling`: SamplingParams fields (max_tokens, temperature, top_p, seed, stop, num_beams...).
    `speculative`: "mtp" (drafts from the model's MTP modules) or "draft" (from `draft_model`,
    a smaller model with the same tokenizer); `num_draft` tokens are drafted per step. Greedy
    output is the same as without; sampled output has the same distribution.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    params = SamplingParams(**sampling)
    spec = None
    if speculative is not None or draft_model is not None:
        spec = Speculative(speculative or "draft", num_draft, draft_model)
    stats = Stats()
    out = [""] * len(prompts)
    for r, delta in stream(
        model, tokenizer, prompts, params, stats, truncate_prompt, compiled, spec
    ):
        out[r] += delta
    if verbose:
        print(stats.report(), file=sys.stderr)
    return out[0] if isinstance(prompt, str) else out
