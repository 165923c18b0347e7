"""Text generation: prefill, then a compiled one-token decode step; sampling or beam search.

    python -m mlx_model.generate --model DIR --prompt "The" [--prompts-file F] [sampling flags]
    from mlx_model import load, generate; model, tok = load(DIR); generate(model, tok, "The")

Token-level decoding (prefill, the compiled step over fixed-size caches) is mlx_model/decoding.py;
this module turns it into text (streaming, stop strings), runs beam search (beams are batch rows
of a KVCache, reordered after every step), and is the CLI.
"""

from __future__ import annotations

import mlx_model  # noqa: F401  # isort: skip  (loads a fast BLAS before MLX)

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from .cache import make_cache
from .checkpoint import CheckpointError, load_model, require_dir
from .data import DataError, Tokenizer
from .decoding import Stats, decode
from .sampling import SamplingError, SamplingParams, beam_search


class GenerateError(ValueError):
    """Bad generation input (prompt, tokenizer); the message is one line naming the fix."""


# ----------------------------------------------------------------------------- loading
def load(path: str) -> tuple[Any, Tokenizer]:
    """(model, tokenizer) from a checkpoint directory (ours or Hugging Face deepseek_v3)."""
    require_dir(path)
    model = load_model(path)
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise GenerateError(
            f"the tokenizer in {path} has {tokenizer.vocab_size} tokens but the model only "
            f"{model.args.vocab_size}: they do not belong together"
        )
    model.eval()  # capacity dropping is training-only
    return model, tokenizer


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
) -> Iterator[tuple[int, str]]:
    """Yield (prompt index, new text) as tokens arrive; all prompts decode together.

    Stops at eos, a stop string (the text is cut before it) or max_tokens new tokens.
    compiled=False runs the decode step eagerly (same tokens; no JIT compile on first use).
    """
    params.validate()
    stats = stats if stats is not None else Stats()
    window = model.args.max_position_embeddings
    ids = [encode_prompt(tokenizer, p, window, params.max_tokens, truncate_prompt) for p in prompts]
    room = window - max(len(i) for i in ids)
    if room < params.max_tokens:  # never run past the trained positions
        params = replace(params, max_tokens=room)
    resegment = not tokenizer.is_sentencepiece
    if params.num_beams > 1:
        kw = dict(eos_id=tokenizer.eos_id, length_penalty=params.length_penalty)
        for r, p in enumerate(ids):
            cache = make_cache(model.args)
            tic = time.perf_counter()
            res = beam_search(
                model,
                cache,
                p,
                params.num_beams,
                params.max_tokens,
                **kw,
                early_stopping=params.early_stopping,
            )
            mx.eval(cache[0].state)
            stats.prompt_tokens += len(p)
            stats.generated_tokens += len(res.tokens)
            stats.generate_time += time.perf_counter() - tic
            stats.cache_numbers_per_token = sum(c.numbers_per_token() for c in cache)
            stats.cache_bytes_per_token = sum(c.nbytes_per_token() for c in cache)
            row, text = _Row(), ""
            for t in res.tokens:
                text += _push(row, t, tokenizer, params.stop, resegment)
                if row.done:
                    break
            yield r, text + _flush(row)
        return
    rows = [_Row() for _ in ids]
    gen = decode(model, ids, params, stats, compiled, unpenalised=tokenizer.bos_id)
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
    **sampling: Any,
) -> str | list[str]:
    """Continuation of `prompt` (or a list of continuations for a list of prompts).

    `sampling`: SamplingParams fields (max_tokens, temperature, top_p, seed, stop, num_beams...).
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    params = SamplingParams(**sampling)
    stats = Stats()
    out = [""] * len(prompts)
    for r, delta in stream(model, tokenizer, prompts, params, stats, truncate_prompt, compiled):
        out[r] += delta
    if verbose:
        print(stats.report(), file=sys.stderr)
    return out[0] if isinstance(prompt, str) else out


# --------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_model.generate", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", help="checkpoint directory (default: weights/deepseek-small)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompts-file", help="file with one prompt per line (blank lines skipped)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    d = SamplingParams()
    for name, kind, text in [
        ("max_tokens", int, "new tokens per prompt"),
        ("temperature", float, "0 = greedy"),
        ("temperature_end", float, "linear schedule to this temperature over --max-tokens"),
        ("top_k", int, "keep the k most likely tokens (0 = off)"),
        ("top_p", float, "keep the most likely tokens up to probability mass p (1 = off)"),
        ("min_p", float, "keep tokens with p >= min_p * p_max (0 = off)"),
        ("repetition_penalty", float, "CTRL-style, on prompt + generated tokens (1 = off)"),
        ("presence_penalty", float, "OpenAI-style (0 = off)"),
        ("frequency_penalty", float, "OpenAI-style (0 = off)"),
        ("seed", int, "random seed for reproducible sampling"),
        ("num_beams", int, "> 1: beam search (deterministic; sampling flags unused)"),
        ("length_penalty", float, "beam score = sum logprob / len ** length_penalty"),
    ]:
        flag = "--" + name.replace("_", "-")
        p.add_argument(
            flag, type=kind, default=getattr(d, name), help=f"{text} (default {getattr(d, name)})"
        )
    p.add_argument(
        "--early-stopping", action="store_true", help="beam search: stop at num_beams finished"
    )
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--truncate-prompt", action="store_true", help="keep the end of a too-long prompt"
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="eager decode step (on the CPU backend the "
        "compiled step is ~2x faster, but its first use JIT-compiles kernels for ~20-60 s)",
    )
    p.add_argument("--verbose", action="store_true", help="statistics to stdout instead of stderr")
    return p


def _prompts(a: argparse.Namespace) -> list[str]:
    prompts = list(a.prompt)
    if a.prompts_file:
        try:
            with open(a.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\r\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise GenerateError(f"cannot read --prompts-file {a.prompts_file}: {e}") from None
        if not prompts:
            raise GenerateError(f"--prompts-file {a.prompts_file} has no prompts (one per line)")
    if not prompts:
        raise GenerateError("no prompt: pass --prompt TEXT or --prompts-file FILE")
    return prompts


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    keys = SamplingParams.__dataclass_fields__
    params = SamplingParams(**{k: v for k, v in vars(a).items() if k in keys})
    try:
        params.validate()
        if a.batch_size < 1:
            raise GenerateError(f"--batch-size {a.batch_size}: must be >= 1")
        prompts = _prompts(a)
        if a.model is None:
            from .train import DEFAULT_OUT

            a.model = DEFAULT_OUT
            if not Path(DEFAULT_OUT, "config.json").is_file():
                raise GenerateError(
                    f"no model at {DEFAULT_OUT}: train one with `python -m mlx_model.train` or pass --model DIR"
                )
        model, tokenizer = load(a.model)
        window = model.args.max_position_embeddings
        for p in prompts:  # all bad prompts fail before any output
            encode_prompt(tokenizer, p, window, params.max_tokens, a.truncate_prompt)
        stats, out = Stats(), sys.stdout
        for start in range(0, len(prompts), a.batch_size):
            batch = prompts[start : start + a.batch_size]
            texts = [""] * len(batch)
            if len(batch) == 1:  # one prompt: stream the continuation as it comes
                out.write(batch[0])
                out.flush()
            for r, delta in stream(
                model, tokenizer, batch, params, stats, a.truncate_prompt, not a.no_compile
            ):
                if len(batch) == 1:
                    out.write(delta)
                    out.flush()
                texts[r] += delta
            for r, text in enumerate(texts):
                if len(batch) > 1:  # several: each prompt + continuation when the batch is done
                    out.write(batch[r] + text)
                out.write("\n\n" if start + r + 1 < len(prompts) else "\n")
            out.flush()
    except (GenerateError, SamplingError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    print(stats.report(), file=sys.stdout if a.verbose else sys.stderr)


class _CallableModule(type(sys)):
    """`from mlx_model import generate` gives this module when it was imported first; calling
    it calls generate(), so the package API works in either import order."""

    def __call__(self, *args: Any, **kw: Any) -> str | list[str]:
        return generate(*args, **kw)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()
