"""The on-disk token store: ids appended as a corpus is tokenized, memory-mapped for training.

A store directory holds tokens.bin (the packed stream, end-of-text after every document, as
raw uint16 when the vocabulary fits, else uint32), meta.json (dtype, token count, where the
validation split starts) and the tokenizer. `write_tokens` tokenizes a Corpus batch by batch,
the tokenizer's batch encoding of the next batch running while this one is written, so memory
stays bounded by a few batches. `open_store` memory-maps the stream: nothing is copied into RAM.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .data_errors import DataError
from .sources import Corpus

TOKENS = "tokens.bin"
META = "meta.json"
BATCH_CHARS = 1 << 21  # text handed to one batch encoding call (~2 MB)
BATCH_PIECES = 4096


def store_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def progress_bar(desc: str, total: int | None, enabled: bool) -> Any:
    """A tqdm bar on stderr in bytes (MB done, MB/s, ETA when the total is known)."""
    from tqdm import tqdm

    return tqdm(
        desc=desc,
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=0.5,
    )


def disk_error(where: Path, e: OSError) -> DataError:
    return DataError(
        f"cannot write the token cache in {where} ({e.strerror or e}): free some disk space "
        "or pass --cache-dir on a disk with room"
    )


class TokenWriter:
    """Appends id arrays to tokens.bin in `directory`; counts them."""

    def __init__(self, directory: Path, dtype: np.dtype):
        self.path, self.dtype, self.count = directory / TOKENS, dtype, 0
        self.file = open(self.path, "wb")

    def append(self, ids: np.ndarray) -> None:
        try:
            self.file.write(memoryview(np.ascontiguousarray(ids, self.dtype)))
        except OSError as e:  # ENOSPC, EFBIG, EIO
            raise disk_error(self.path.parent, e) from None
        self.count += len(ids)

    def close(self) -> None:
        try:
            self.file.close()
        except OSError as e:
            raise disk_error(self.path.parent, e) from None


def _pack(lists: list[list[int]], ends: list[bool], eos: int, dtype: np.dtype) -> np.ndarray:
    """Concatenate the pieces' ids, an eos after each piece that ends a document."""
    out = np.empty(sum(map(len, lists)) + sum(ends), dtype)
    i = 0
    for ids, end in zip(lists, ends):
        out[i : i + len(ids)] = ids
        i += len(ids)
        if end:
            out[i] = eos
            i += 1
    return out


def write_tokens(tok: Any, corpus: Corpus, writer: TokenWriter, progress: bool) -> int:
    """Tokenize every piece of `corpus` into `writer`; returns the number of documents."""
    if tok.eos_id is None:
        raise DataError("the tokenizer has no end-of-text token: use a tokenizer with an eos token")
    bar = progress_bar("tokenizing", corpus.total_bytes(), progress)
    pending = None  # (future ids, ends, source position) of the batch being encoded
    with bar, ThreadPoolExecutor(1) as pool:

        def flush(new) -> None:
            nonlocal pending
            if pending is not None:
                future, ends, pos = pending
                writer.append(_pack(future.result(), ends, tok.eos_id, writer.dtype))
                bar.update(pos - bar.n)
            pending = new

        texts: list[str] = []
        ends: list[bool] = []
        chars = 0
        for piece, end, pos in corpus.pieces():
            texts.append(piece)
            ends.append(end)
            chars += len(piece)
            if chars >= BATCH_CHARS or len(texts) >= BATCH_PIECES:
                flush((pool.submit(tok.encode_batch, texts), ends, pos))
                texts, ends, chars = [], [], 0
        if texts:
            flush((pool.submit(tok.encode_batch, texts), ends, corpus.pos))
        flush(None)
    return corpus.documents


def tokenize_to_file(
    tok: Any, corpus: Corpus, directory: Path, progress: bool
) -> tuple[np.ndarray, int]:
    """Every document of `corpus` tokenized (an eos after each) into directory/tokens.bin;
    returns the ids memory-mapped (memory stays bounded whatever the corpus size) and the
    number of documents."""
    writer = TokenWriter(Path(directory), store_dtype(tok.vocab_size))
    try:
        documents = write_tokens(tok, corpus, writer, progress)
    finally:
        writer.close()
    if writer.count == 0:
        return np.zeros(0, writer.dtype), documents
    ids = np.memmap(writer.path, dtype=writer.dtype, mode="r", shape=(writer.count,))
    return ids, documents


def write_meta(directory: Path, meta: dict) -> None:
    try:
        (directory / META).write_text(json.dumps(meta) + "\n")
    except OSError as e:
        raise disk_error(directory, e) from None


def open_store(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) views of the memory-mapped token stream in a finished store directory."""
    meta = json.loads((directory / META).read_text())
    dtype, n = np.dtype(meta["dtype"]), meta["tokens"]
    path = directory / TOKENS
    if path.stat().st_size != n * dtype.itemsize:
        raise DataError(f"token cache {directory} is damaged (wrong size): delete it and rerun")
    ids = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    return ids[: meta["train"]], ids[meta["train"] :]
