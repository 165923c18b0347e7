"""Data preparation benchmark: `python -m tools.bench data [--size-mb 1000] [--files 10000]`.

Writes synthetic text (Zipf-distributed pseudo-words in sentences and paragraphs, a 16 MB block
repeated) of the given size once as ONE file and once as MANY files, and for each measures, in
fresh processes so each peak RSS is its own: tokenizer training (the BPE on its bounded sample),
tokenizing into the token store (mlx_model.data.prepare_data with that tokenizer), a cached
start (prepare_data on a cache hit plus the first batch), and, before and after tokenizing,
the `tokenizers` library's own encode_batch (and encode_batch_fast) on the same pieces of the
same text, held in memory: the ceiling the store path can approach. Peak RSS is ru_maxrss of
the phase's process (imports included).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BLOCK = 16 << 20


def peak_rss() -> int:
    """This process's peak resident set in bytes. Linux: VmHWM, which starts afresh at exec
    (ru_maxrss would carry over the parent's peak across fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def text_block(seed: int = 0) -> bytes:
    """16 MB of English-like text: Zipf-distributed words, sentences, blank-line paragraphs."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = 1 / np.arange(1, 27) ** 0.8
    lengths = rng.integers(1, 11, 30_000)
    chars = rng.choice(letters, int(lengths.sum()), p=freq / freq.sum())
    words = np.array(["".join(w) for w in np.split(chars, np.cumsum(lengths)[:-1])])
    zipf = 1 / np.arange(1, len(words) + 1)
    ends = np.array([" ", ". ", ", ", "? ", ".\n\n"])
    n = BLOCK // 5
    text = words[rng.choice(len(words), n, p=zipf / zipf.sum())]
    seps = ends[rng.choice(len(ends), n, p=[0.8, 0.1, 0.05, 0.01, 0.04])]
    return "".join(np.char.add(text, seps)).encode()[:BLOCK]


def write_corpora(root: Path, size: int, files: int) -> tuple[Path, Path]:
    block = text_block()
    one = root / "one.txt"
    with open(one, "wb") as f:
        for i in range(0, size, BLOCK):
            f.write(block[: min(BLOCK, size - i)])
    many = root / "many"
    many.mkdir()
    per = size // files
    for i in range(files):
        start = (i * per) % (BLOCK - per)
        (many / f"{i:05d}.txt").write_bytes(block[start : start + per])
    return one, many


# ---------------------------------------------------------------------------------------------
# Phases (each in its own process)


def phase(name: str, data: str, work: str, vocab: int) -> dict:
    from mlx_model import data as D
    from mlx_model import store

    w = Path(work)
    t0 = time.perf_counter()
    if name == "train":
        corpus, taken = D.Corpus([data]), [0]

        def counted():
            for piece in D._sample(corpus, D.TOKENIZER_SAMPLE_BYTES, progress=False):
                taken[0] += len(piece.encode())
                yield piece

        tok = D.train_tokenizer(counted(), vocab)
        seconds = time.perf_counter() - t0
        tok.save(str(w / "tok"))
        return dict(seconds=seconds, mb=taken[0] / 1e6, peak_rss=peak_rss())
    if name == "tokenize":
        D.prepare_data([data], str(w / "tok"), vocab, str(w / "cache"), progress=False)
        return dict(seconds=time.perf_counter() - t0, peak_rss=peak_rss())
    if name == "cached":
        tok, train, val = D.prepare_data([data], str(w / "tok"), vocab, str(w / "cache"))
        D.get_batch(train, 16, 128, seed=0, step=0)
        return dict(seconds=time.perf_counter() - t0, tokens=len(train) + len(val))
    # ceiling: the library's own batch encoding of the same pieces, already in memory
    tok = D.Tokenizer.load(str(w / "tok"))
    batches, batch, chars, total = [], [], 0, 0
    for piece, _, _ in D.Corpus([data]).pieces():
        batch.append(piece)
        chars += len(piece)
        total += len(piece.encode())
        if chars >= store.BATCH_CHARS or len(batch) >= store.BATCH_PIECES:
            batches.append(batch)
            batch, chars = [], 0
        if total >= 16e6:
            break
    batches.append(batch)
    out = dict(mb=total / 1e6)
    for fn in ("encode_batch", "encode_batch_fast"):
        encode = getattr(tok.backend, fn)
        t0 = time.perf_counter()
        for b in batches:
            encode(b, add_special_tokens=False)
        out[fn] = total / 1e6 / (time.perf_counter() - t0)
    return out


def run_phase(name: str, data: Path, work: Path, vocab: int) -> dict:
    cmd = [sys.executable, "-m", "tools.bench_data", "_phase", name, str(data), str(work)]
    t0 = time.perf_counter()
    r = subprocess.run([*cmd, str(vocab)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: phase {name} failed: {r.stderr.strip().splitlines()[-1:]}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]), wall=time.perf_counter() - t0)


def measure(data: Path, size_mb: float, work: Path, vocab: int) -> dict:
    work.mkdir(parents=True)
    res = dict(train=run_phase("train", data, work, vocab))
    res["ceiling_before"] = run_phase("ceiling", data, work, vocab)
    res["tokenize"] = run_phase("tokenize", data, work, vocab)
    res["ceiling_after"] = run_phase("ceiling", data, work, vocab)
    res["cached"] = run_phase("cached", data, work, vocab)
    res["tokenize"]["mb_s"] = size_mb / res["tokenize"]["seconds"]
    res["train"]["mb_s"] = res["train"]["mb"] / res["train"]["seconds"]
    for fn in ("encode_batch", "encode_batch_fast"):
        res[fn] = (res["ceiling_before"][fn] + res["ceiling_after"][fn]) / 2
    return res


def print_table(label: str, r: dict) -> None:
    gb = 1e9
    t, k, c = r["train"], r["tokenize"], r["cached"]
    rows = [
        f"{label}",
        f"  tokenizer training   {t['mb_s']:7.2f} MB/s  ({t['mb']:.0f} MB sample, "
        f"{t['seconds']:.1f} s)  peak RSS {t['peak_rss'] / gb:.2f} GB",
        f"  tokenizing -> store  {k['mb_s']:7.2f} MB/s  ({k['seconds']:.1f} s)  "
        f"peak RSS {k['peak_rss'] / gb:.2f} GB",
    ]
    for fn in ("encode_batch", "encode_batch_fast"):
        before, after = r["ceiling_before"][fn], r["ceiling_after"][fn]
        rows.append(
            f"  {fn:<20} {r[fn]:7.2f} MB/s  (before {before:.2f}, after {after:.2f}; text in "
            f"memory)  store / this = {k['mb_s'] / r[fn]:.2f}x"
        )
    rows.append(
        f"  cached start         {c['seconds']:7.2f} s in-process ({c['wall']:.2f} s with "
        f"interpreter start; {c['tokens'] / 1e6:.0f}M tokens)"
    )
    print("\n".join(rows), flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_phase":
        name, data, work, vocab = argv[1:5]
        print(json.dumps(phase(name, data, work, int(vocab))))
        return
    p = argparse.ArgumentParser(
        prog="python -m tools.bench data", description=__doc__.split("\n")[0]
    )
    p.add_argument("--size-mb", type=float, default=1000, help="corpus size in MB (10^6 bytes)")
    p.add_argument(
        "--files", type=int, default=10_000, help="number of files in the many-file corpus"
    )
    p.add_argument(
        "--vocab-size", type=int, default=4096, help="BPE vocabulary (the small preset's)"
    )
    p.add_argument(
        "--work", default=None, help="scratch directory (default: a temporary one, removed)"
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    root = Path(a.work or tempfile.mkdtemp(prefix="bench-data-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        size = int(a.size_mb * 1e6)
        one, many = write_corpora(root, size, a.files)
        results = {}
        for label, data in (
            (f"{a.size_mb:g} MB, one file", one),
            (f"{a.size_mb:g} MB, {a.files} files", many),
        ):
            results[label] = measure(data, size / 1e6, root / f"w-{data.name}", a.vocab_size)
            print_table(label, results[label])
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    finally:
        if a.work is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
