"""Command line for text generation (the library is mlx_model.generation and mlx_model.engine).

    python -m mlx_model.generate --model DIR --prompt "The" [--prompts-file F] [sampling flags]
    python -m mlx_model.generate --model DIR --prompt "The" --temperature 0 --speculative mtp

This module holds only the CLI. `from mlx_model import load, generate` gives the functions of
mlx_model.generation (the package's lazy attributes); importing this module by name binds the
package attribute `generate` to it, as Python does for every submodule, so library code never
imports it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a program: fast BLAS + kernels before mlx.core is imported
    from mlx_model.speedups import enable_for_cli

    enable_for_cli()

from .checkpoint import CheckpointError
from .data import DataError
from .engine import Engine, Stats
from .generation import GenerateError, encode_prompt, load, stream
from .quantize import QuantizeError
from .sampling import SamplingError, SamplingParams
from .speculative import Speculative, SpeculativeError
from .train_config import DEFAULT_OUT


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
    p.add_argument(
        "--speculative",
        choices=["mtp"],
        help="mtp: self-speculative decoding, the model's own multi-token-prediction module "
        "drafts and the model verifies all drafts in one pass (greedy: the same tokens; "
        "sampling: the same distribution)",
    )
    p.add_argument(
        "--num-draft",
        type=int,
        default=1,
        help="speculative decoding: tokens drafted per verification step (default 1: on the "
        "CPU verifying each extra token costs more than a deeper draft gains; tools/spec_cost.py)",
    )
    p.add_argument(
        "--draft-model",
        help="speculative decoding with this smaller checkpoint (same tokenizer) as the drafter",
    )
    p.add_argument(
        "--quantize",
        type=int,
        help="quantize the weights on load to 4 or 8 bits (affine, per group)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=64,
        help="--quantize: weights per scale/bias group (32, 64 or 128; default 64)",
    )
    p.add_argument("--verbose", action="store_true", help="statistics to stdout instead of stderr")
    return p


def speculative_from_args(a: argparse.Namespace, tokenizer) -> Speculative | None:
    """The --speculative/--num-draft/--draft-model flags as a Speculative (None: off)."""
    if a.num_draft < 1:
        raise GenerateError(f"--num-draft {a.num_draft}: must be >= 1 (tokens drafted per step)")
    if a.draft_model is None and a.speculative is None:
        return None
    if a.draft_model is not None and a.speculative is not None:
        raise GenerateError("--speculative mtp and --draft-model: choose one drafter")
    draft = None
    if a.draft_model is not None:
        draft, draft_tok = load(a.draft_model, a.quantize, a.group_size)
        Speculative.check_tokenizers(tokenizer, draft_tok, a.draft_model)
    return Speculative("mtp" if draft is None else "draft", a.num_draft, draft)


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
            a.model = DEFAULT_OUT
            if not Path(DEFAULT_OUT, "config.json").is_file():
                raise GenerateError(
                    f"no model at {DEFAULT_OUT}: train one with `python -m mlx_model.train` "
                    "or pass --model DIR"
                )
        model, tokenizer = load(a.model, a.quantize, a.group_size)
        spec = speculative_from_args(a, tokenizer)
        if spec is not None:  # refuse before any output
            spec.check(model, params)
        engine = Engine(model)
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
                engine, tokenizer, batch, params, stats, a.truncate_prompt, not a.no_compile, spec
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
    except (
        GenerateError,
        SamplingError,
        CheckpointError,
        DataError,
        SpeculativeError,
        QuantizeError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    print(stats.report(), file=sys.stdout if a.verbose else sys.stderr)


if __name__ == "__main__":
    main()
