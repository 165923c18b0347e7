"""Cross-entropy and perplexity of a checkpoint on any text:
`python -m mlx_model.evaluate --model DIR --data PATH [PATH ...]`.

The text is tokenized with the checkpoint's own tokenizer, as training does (sources.Corpus
pieces, end-of-text after each document), into a temporary memory-mapped file, and scored in
non-overlapping windows of --seq-len tokens, one batch in memory at a time: any size of text
evaluates in bounded memory.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile

if __name__ == "__main__":  # run as a program: fast BLAS + kernels before mlx.core is imported
    from mlx_model.speedups import enable_for_cli

    enable_for_cli()

import numpy as np

from .checkpoint import CheckpointError, load_model, require_dir
from .data import DataError, Tokenizer, window_batches
from .loss import summed_cross_entropy
from .sources import Corpus
from .store import tokenize_to_file


def evaluate(
    model, ids: np.ndarray, seq_len: int, batch_size: int = 8, max_batches: int = 10**9
) -> dict:
    """Token-weighted mean CE over consecutive windows of `ids`; returns ce, ppl, tokens."""
    total, n = summed_cross_entropy(model, window_batches(ids, batch_size, seq_len, max_batches))
    total = total.item()
    return {"ce": total / n, "ppl": math.exp(total / n), "tokens": n}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m mlx_model.evaluate", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="text files, directories, .jsonl(.gz/.zst), .parquet, save_to_disk directories or "
        "hf:NAME[:CONFIG][:SPLIT]",
    )
    p.add_argument(
        "--text-field", default="text", help="field read from .jsonl lines, parquet and datasets"
    )
    p.add_argument("--seq-len", type=int, default=128, help="tokens per scored window")
    p.add_argument("--batch-size", type=int, default=8, help="windows scored per forward pass")
    a = p.parse_args(argv)
    try:
        require_dir(a.model)
        tok = Tokenizer.load(a.model)
        model = load_model(a.model)
        if tok.vocab_size > model.args.vocab_size:
            raise DataError(
                f"tokenizer in {a.model} has {tok.vocab_size} tokens, the model {model.args.vocab_size}"
            )
        if a.seq_len < 1 or a.seq_len > model.args.max_position_embeddings:
            raise DataError(f"--seq-len must be in 1..{model.args.max_position_embeddings}")
        with tempfile.TemporaryDirectory(prefix="mlx_model-evaluate-") as tmp:
            ids, _ = tokenize_to_file(tok, Corpus(a.data, a.text_field), tmp, progress=False)
            if len(ids) < a.seq_len + 1:
                raise DataError(
                    f"the text has {len(ids)} tokens, fewer than one window of {a.seq_len + 1}: "
                    "add text or lower --seq-len"
                )
            r = evaluate(model, ids, a.seq_len, a.batch_size)
            del ids  # the memory map, before its file goes
    except (DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"ce {r['ce']:.4f}  ppl {r['ppl']:.2f}  ({r['tokens']} tokens)")


if __name__ == "__main__":
    main()
