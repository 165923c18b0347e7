"""Streaming data preparation: bounded memory, the memory-mapped token store, progress, file
formats and datasets (all built here: nothing downloads), and failures that leave no cache."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlx_model import data, sources, store
from mlx_model.data import DataError

ROOT = Path(__file__).resolve().parents[1]
# ASCII words plus accents, CJK, emoji and odd whitespace (no-break space, tabs, blank lines)
ALPHABET = list("abcdefghij klmnop  qrstuvwxyz.,;!?\n\n\t") + list("éüßñΩλ日本語🙂\u00a0\u3000")


def random_text(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(ALPHABET, size=n))


def random_docs(seed: int, n_docs: int, length: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [random_text(rng, int(rng.integers(length // 2, length))) for _ in range(n_docs)]


def stream(*parts) -> list[int]:
    return np.concatenate([np.asarray(p) for p in parts]).tolist()


def packed(tok, docs: list[str]) -> list[int]:
    """Version 2's stream: each whole document's ids, then eos."""
    return [i for d in docs for i in tok.encode(d) + [tok.eos_id]]


@pytest.fixture(scope="module")
def bpe():
    return data.train_tokenizer(random_docs(0, 40, 300), vocab_size=320)


# ---------------------------------------------------------------------------------------------
# Cutting long documents


@pytest.mark.parametrize("seed, limit", [(1, 64), (2, 200), (3, 1000)])
def test_cuts_keep_the_bpe_ids_of_the_whole_document(bpe, seed: int, limit: int):
    doc = random_text(np.random.default_rng(seed), 20_000)
    pieces = list(sources.split_document([doc[:7000], doc[7000:]], limit))
    assert "".join(pieces) == doc and len(pieces) > 20_000 // limit
    assert all(0 < len(p) <= limit for p in pieces)
    assert [i for p in pieces for i in bpe.encode(p)] == bpe.encode(doc)


def test_cut_prefers_blank_lines_and_falls_back_mid_word():
    text = "word " * 30 + "end.\n\n  next " + "x" * 40
    cut = sources._cut(text, 0, 200)
    assert text[:cut].endswith("end.") and text[cut:].startswith("\n\n  next")
    assert sources._cut(text, 10, 200) == cut
    assert sources._cut("y" * 100, 20, 50) == 70  # no whitespace at all: a hard cut


def test_stream_equals_whole_documents(tmp_path: Path, monkeypatch):
    # Tiny pieces and batches: every document is cut, every batch path runs.
    monkeypatch.setattr(sources, "PIECE_CHARS", 300)
    monkeypatch.setattr(store, "BATCH_CHARS", 2000)
    docs = random_docs(4, 12, 3000) + ["short one"]
    (tmp_path / "c").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "c" / f"{i:02d}.txt").write_text(d)
    tok, train, val = data.prepare_data([str(tmp_path / "c")], None, 300, str(tmp_path / "k"))
    ref = data.train_tokenizer(docs, 300)  # whole documents, in memory
    assert tok.fingerprint() == ref.fingerprint()
    assert stream(train, val) == packed(ref, docs)
    assert isinstance(train, np.memmap) and train.dtype == np.uint16


def test_default_corpus_stream_is_unchanged(tmp_path: Path):
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics) if topics[k].strip()]
    tok, train, val = data.prepare_data(None, None, 400, str(tmp_path), val_fraction=0.05)
    ref = data.train_tokenizer(docs, 400)
    assert tok.fingerprint() == ref.fingerprint()
    assert stream(train, val) == packed(ref, docs)


def test_tokenizer_sample_is_bounded_and_spread(tmp_path: Path):
    for i in range(20):
        (tmp_path / f"{i:02d}.txt").write_text(f"file{i} " * 2000)  # 14-16 KB each
    corpus = sources.Corpus([str(tmp_path)])
    sample = list(data._sample(corpus, 40_000, progress=False))
    assert 30_000 <= sum(map(len, sample)) <= 40_000 + sources.PIECE_CHARS
    seen = {s.split()[0] for s in sample}
    assert {"file0", "file19"} <= seen and len(seen) < 20  # first and last files, not all


# ---------------------------------------------------------------------------------------------
# Memory: a 50 MB one-line file, prepared in a fresh process

MEASURE = """
import resource, sys
from pathlib import Path
from mlx_model import data
def peak():  # Linux VmHWM: this process's own peak (ru_maxrss keeps the parent's over exec)
    status = Path("/proc/self/status")
    if status.is_file():
        return int(status.read_text().split("VmHWM:")[1].split()[0]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes
data.TOKENIZER_SAMPLE_BYTES = 4 << 20
data.prepare_data([sys.argv[1]], None, 300, sys.argv[2], progress=False)  # warm up: imports
base = peak()
tok, train, val = data.prepare_data([sys.argv[3]], None, 300, sys.argv[2], progress=False)
print(peak() - base, len(train) + len(val))
"""


def test_preparing_a_large_one_line_file_keeps_memory_bounded(tmp_path: Path):
    rng = np.random.default_rng(5)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 6)) for _ in range(5000)]
    big = tmp_path / "big.txt"
    with open(big, "w") as f:
        while f.tell() < 50_000_000:  # one line, no blank lines: cut at spaces
            f.write(" ".join(rng.choice(words, 100_000)) + " ")
    (tmp_path / "warm.txt").write_text(" ".join(words))
    r = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "warm.txt"), str(tmp_path / "k"), str(big)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    growth, n_tokens = map(int, r.stdout.split())
    # The whole file as text is 50 MB, its Encoding objects several GB (version 2 peaked at
    # 22.7 GB for 100 MB); a streaming pass stays under a bound that does not grow with it.
    assert n_tokens > 5_000_000
    assert growth < 300e6, f"RSS grew by {growth / 1e6:.0f} MB while preparing 50 MB"


# ---------------------------------------------------------------------------------------------
# Failures leave no cache that a later run trusts

KILLED = """
import sys, time
from mlx_model import data, store
store.BATCH_CHARS = 1 << 12
append = store.TokenWriter.append
store.TokenWriter.append = lambda self, ids: (append(self, ids), time.sleep(0.05))  # slow disk
data.prepare_data([sys.argv[1]], None, 300, sys.argv[2], progress=False)
"""


def cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))


def test_killed_preparation_leaves_no_trusted_cache(tmp_path: Path):
    text = random_text(np.random.default_rng(6), 200_000)
    (tmp_path / "a.txt").write_text(text)
    cache = tmp_path / "k"
    p = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path / "a.txt"), str(cache)])
    try:
        deadline = time.time() + 300
        while not any(f.stat().st_size > 0 for f in cache.glob(".tmp-*/tokens.bin")):
            assert p.poll() is None and time.time() < deadline, "finished before it was killed"
            time.sleep(0.02)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert cache_entries(cache) == []  # only the hidden temporary directory
    tok, train, val = data.prepare_data([str(tmp_path / "a.txt")], None, 300, str(cache))
    assert stream(train, val) == packed(tok, [text]) and len(cache_entries(cache)) == 1


def test_disk_full_is_one_error_and_no_cache(tmp_path: Path, monkeypatch):
    (tmp_path / "a.txt").write_text(random_text(np.random.default_rng(7), 200_000))

    class Full:  # a file on a disk that fills up after 10 KB
        def __init__(self, *a, **k):
            self.written = 0

        def write(self, b):
            self.written += len(b)
            if self.written > 10_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            pass

    monkeypatch.setattr(store, "open", Full, raising=False)
    monkeypatch.setattr(store, "BATCH_CHARS", 5000)
    with pytest.raises(DataError, match="No space left on device.*--cache-dir"):
        data.prepare_data([str(tmp_path / "a.txt")], None, 300, str(tmp_path / "k"))
    assert list((tmp_path / "k").iterdir()) == []


def test_cli_file_size_limit_is_one_error_line(tmp_path: Path):
    import resource

    (tmp_path / "a.txt").write_text(random_text(np.random.default_rng(8), 400_000))

    def limit():  # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    cache = tmp_path / "k"
    args = ["--preset", "tiny", "--data", str(tmp_path / "a.txt"), "--max-steps", "1"]
    args += ["--cache-dir", str(cache), "--out", str(tmp_path / "o"), "--progress", "false"]
    r = subprocess.run(
        [sys.executable, "-m", "mlx_model.train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert err[-1].startswith("error: cannot write the token cache"), err[-1]
    assert cache_entries(cache) == []


# ---------------------------------------------------------------------------------------------
# Progress bars


def test_progress_bars_on_stderr_and_off(tmp_path: Path, capfd):
    (tmp_path / "a.txt").write_text(random_text(np.random.default_rng(9), 50_000))
    data.prepare_data([str(tmp_path / "a.txt")], None, 300, str(tmp_path / "k1"), progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "training tokenizer" in err and "tokenizing" in err
    assert "B/s" in err and "100%" in err
    data.prepare_data([str(tmp_path / "a.txt")], None, 300, str(tmp_path / "k2"), progress=False)
    assert capfd.readouterr() == ("", "")


# ---------------------------------------------------------------------------------------------
# The store itself


@pytest.mark.parametrize("vocab, dtype", [(300, np.uint16), (65536, np.uint16), (65537, np.uint32)])
def test_store_round_trip_and_dtype(tmp_path: Path, vocab: int, dtype):
    ids = np.random.default_rng(vocab).integers(0, vocab, 10_000)
    writer = store.TokenWriter(tmp_path, store.store_dtype(vocab))
    for part in np.array_split(ids, 7):
        writer.append(part)
    writer.close()
    store.write_meta(tmp_path, dict(dtype=writer.dtype.name, tokens=writer.count, train=9000))
    train, val = store.open_store(tmp_path)
    assert train.dtype == val.dtype == dtype and isinstance(train, np.memmap)
    assert np.array_equal(np.concatenate([train, val]), ids) and len(val) == 1000
    assert (tmp_path / "tokens.bin").stat().st_size == len(ids) * np.dtype(dtype).itemsize
    with open(tmp_path / "tokens.bin", "ab") as f:  # a damaged store is refused, not read
        f.write(b"\0")
    with pytest.raises(DataError, match="damaged"):
        store.open_store(tmp_path)
