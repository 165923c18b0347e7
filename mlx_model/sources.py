"""Text sources read as a stream: memory bounded by the largest piece, not by the corpus.

`Corpus(specs, text_field)` reads, in order: plain text files (read in 4 MiB chunks, one document
per file), `.jsonl` (one document per line), `.parquet` (one document per row), `.gz` / `.zst`
versions of those, directories of them (walked sorted, hidden entries and binary files
skipped), `Dataset.save_to_disk` directories, and `hf:NAME[:CONFIG][:SPLIT]` names loaded
through Hugging Face `datasets` (streaming where it can; the `[data]` extra). No specs: Python's
pydoc topic texts (offline). `Corpus.pieces()` yields (text, ends_document, bytes_read).

Long documents are cut into pieces of at most PIECE_CHARS characters so that tokenizing needs
bounded memory and spreads over every core. A cut goes where a byte-level BPE pre-tokenizer
(GPT-2's regex, ours) splits anyway: at the start of a run of whitespace that follows a
non-space character, preferring a blank line. So our BPE gives exactly the ids of the whole
document; only a stretch of PIECE_CHARS without any whitespace is cut mid-word. Documents up to
PIECE_CHARS are never cut (other tokenizers, e.g. sentencepiece, see them whole).
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .data_errors import DATA_FIX, HF_FIX, DataError, check_text, missing_field

PIECE_CHARS = 1 << 16  # longest piece handed to the tokenizer
CHUNK_BYTES = 4 << 20  # read size for plain text files


# ---------------------------------------------------------------------------------------------
# Cutting long documents


def _cut(buf: str, start: int, limit: int) -> int:
    """A cut in buf[start : start + limit] (start < cut <= start + limit): the start of a
    whitespace run after a non-space character, the latest blank line in the second half of
    the window first, else any such run; with no whitespace there, the window's end."""
    lo, hi = start + limit // 2, start + limit
    for sep in ("\n\n", " ", "\n", "\t"):
        i = buf.rfind(sep, lo, hi)
        while i > lo:
            j = i
            while j > lo and buf[j - 1].isspace():  # walk back to the start of the run
                j -= 1
            if j > lo:
                return j
            i = buf.rfind(sep, lo, i)
    return hi  # no whitespace in the window: cut mid-word


def split_document(chunks: Iterable[str], limit: int = PIECE_CHARS) -> Iterator[str]:
    """Pieces of at most `limit` characters whose concatenation is the document."""
    buf = ""  # text not yet yielded (shorter than `limit` between chunks)
    for chunk in chunks:
        buf = buf + chunk if buf else chunk
        start = 0
        while len(buf) - start > limit:
            cut = _cut(buf, start, limit)
            yield buf[start:cut]
            start = cut
        buf = buf[start:]
    if buf:
        yield buf


# ---------------------------------------------------------------------------------------------
# Files


def _open_raw(path: Path) -> tuple[io.BufferedIOBase, Any]:
    """(decompressed binary stream, the raw file whose .tell() counts bytes read)."""
    raw = open(path, "rb")
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=raw), raw
    if path.suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise DataError(f"{path}: reading .zst needs zstandard: {HF_FIX}") from None
        return io.BufferedReader(_Zstd(raw, zstandard.ZstdDecompressor()), CHUNK_BYTES), raw
    return raw, raw


def _kind(path: Path) -> str:
    """parquet, jsonl or text, from the name (a .gz/.zst suffix is looked through)."""
    name = path.name.lower()
    for ext in (".gz", ".zst"):
        name = name.removesuffix(ext)
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    return "jsonl" if name.endswith(".jsonl") else "text"


def _is_save_to_disk(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


def expand(specs: list[str]) -> list[tuple[str, Path | str, bool]]:
    """(kind, path or hf spec, explicit) per source; directories are walked sorted, hidden
    entries skipped; raises DataError for a path that does not exist."""
    out: list[tuple[str, Path | str, bool]] = []
    for spec in specs:
        p = Path(spec)
        if spec.startswith("hf:"):
            out.append(("hf", spec, True))
        elif _is_save_to_disk(p):
            out.append(("disk", p, True))
        elif p.is_file():
            out.append((_kind(p), p, True))
        elif p.is_dir():
            found = []
            for root, dirs, names in os.walk(p):
                dirs[:] = [d for d in dirs if not d.startswith(".")]  # prune hidden dirs
                found += [Path(root) / n for n in names if not n.startswith(".")]
            out += [(_kind(f), f, False) for f in sorted(found)]
        else:
            raise DataError(f"data path {p} does not exist: {DATA_FIX}")
    return out


class Corpus:
    """Documents from `specs` (see the module docstring), read lazily, as often as needed."""

    def __init__(self, specs: list[str] | None, text_field: str = "text"):
        self.specs = list(specs or [])
        self.text_field = text_field
        self.sources = expand(self.specs)
        self.pos = 0  # source bytes read so far in the current pass (progress, sampling)
        self.documents = 0  # non-blank documents seen in the current pass
        self.hub: dict[str, Any] = {}  # hf: spec -> its loaded dataset (see hf_data.load_hub)

    # ---- what the cache key and the progress bar need, without reading the text
    def signature(self) -> object:
        """What the documents depend on: files by path, size and mtime; datasets by name."""
        if not self.specs:  # the topics differ between Python versions: hash their text
            from pydoc_data.topics import topics

            blob = "\0".join(topics[k] for k in sorted(topics)).encode()
            return hashlib.sha256(blob).hexdigest()
        sig: list[object] = [self.text_field]
        for kind, src, _ in self.sources:
            if kind == "hf":
                from .hf_data import hub_signature

                sig.append(hub_signature(str(src), self.hub))
                continue
            files = [src]
            if kind == "disk":
                files = sorted(p for p in Path(src).rglob("*") if p.is_file())
            for f in files:  # one stat per file: a cached start with 10,000 files stays quick
                st = os.stat(f)
                sig.append((os.path.abspath(f), st.st_size, st.st_mtime_ns))
        return sig

    def total_bytes(self) -> int | None:
        """Bytes one pass reads (files on disk; None when a hub dataset streams)."""
        if not self.specs:
            from pydoc_data.topics import topics

            return sum(len(t.encode()) for t in topics.values())
        total = 0
        for kind, src, _ in self.sources:
            if kind == "hf":
                return None  # streamed: its size is not known before reading it
            if kind == "disk":
                from .hf_data import disk_text_bytes

                total += disk_text_bytes(Path(src), self.text_field)
            else:
                total += os.path.getsize(src)
        return total

    # ---- reading
    def pieces(self, limit: int | None = None) -> Iterator[tuple[str, bool, int]]:
        """(piece, ends_document, bytes read so far); whitespace-only documents are skipped.
        Pieces are at most `limit` characters (default PIECE_CHARS)."""
        limit = limit or PIECE_CHARS
        self.pos, self.documents = 0, 0
        for doc in self._documents():
            held: list[str] = []  # leading whitespace-only pieces, dropped if nothing follows
            last = None  # the piece not yet yielded (it may end the document)
            for piece in split_document(doc, limit):
                if last is None:
                    held.append(piece)
                    if piece.isspace():
                        continue
                    self.documents += 1
                    *before, last = held
                    for p in before:
                        yield p, False, self.pos
                    continue
                yield last, False, self.pos
                last = piece
            if last is not None:
                yield last, True, self.pos
        if self.documents == 0:
            where = ", ".join(self.specs) or "pydoc_data"
            raise DataError(f"no text found in {where}: {DATA_FIX}")

    def _documents(self) -> Iterator[Iterable[str]]:
        """Each document as an iterable of text chunks."""
        if not self.specs:
            from pydoc_data.topics import topics

            for k in sorted(topics):
                self.pos += len(topics[k].encode())
                yield (topics[k],)
            return
        for kind, src, explicit in self.sources:
            if kind == "hf":
                from .hf_data import hub_documents

                yield from hub_documents(str(src), self.text_field, self)
            elif kind == "disk":
                from .hf_data import disk_documents

                yield from disk_documents(Path(src), self.text_field, self)
            elif kind == "parquet":
                yield from self._parquet(Path(src))
            else:
                yield from self._file(Path(src), kind, explicit)

    def _file(self, path: Path, kind: str, explicit: bool) -> Iterator[Iterable[str]]:
        base = self.pos
        stream, raw = _open_raw(path)
        with raw, stream:
            head = _read(stream, path, 8192)
            if b"\0" in head:
                if not explicit:
                    self.pos = base + os.path.getsize(path)
                    return  # a binary file inside a data directory: not text, skip it
                raise DataError(f"{path} is a binary file, not text: {DATA_FIX}")
            if kind == "jsonl":
                yield from self._jsonl(path, head, stream, raw, base)
            else:
                yield self._text_chunks(path, head, stream, raw, base)
        self.pos = base + os.path.getsize(path)

    def _text_chunks(self, path: Path, head: bytes, stream, raw, base: int) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8-sig")()
        done, block = 0, head
        while True:
            final = not block
            try:
                text = decoder.decode(block, final=final)
            except UnicodeDecodeError as e:
                offset = done - len(decoder.getstate()[0]) + e.start
                msg = f"{path} is not UTF-8 (bad byte at offset {offset})"
                raise DataError(f"{msg}: convert it to UTF-8 or remove it from --data") from None
            done += len(block)
            self.pos = base + raw.tell()
            if text:
                yield text
            if final:
                return
            block = _read(stream, path, CHUNK_BYTES)

    def _jsonl(self, path: Path, head: bytes, stream, raw, base: int) -> Iterator[tuple[str]]:
        lines = io.BufferedReader(_Prefixed(head, stream, path), CHUNK_BYTES)
        for n, line in enumerate(lines, start=1):
            self.pos = base + raw.tell()
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line.decode("utf-8-sig") if n == 1 else line)
            except UnicodeDecodeError:
                raise DataError(f"{where} is not UTF-8: convert the file to UTF-8") from None
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: invalid JSON ({e.msg}): write one JSON object per line"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: not a JSON object: write one JSON object per line")
            if self.text_field not in obj:
                raise missing_field(where, self.text_field, obj)
            yield (check_text(where, obj[self.text_field], self.text_field),)

    def _parquet(self, path: Path) -> Iterator[tuple[str]]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow: {HF_FIX}") from None
        base, size = self.pos, os.path.getsize(path)
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises its own error types
            raise DataError(f"{path} is not a parquet file ({e}): {DATA_FIX}") from None
        names = pf.schema_arrow.names
        if self.text_field not in names:
            raise missing_field(str(path), self.text_field, names)
        rows, done = max(pf.metadata.num_rows, 1), 0
        for batch in pf.iter_batches(batch_size=1024, columns=[self.text_field]):
            yield from arrow_documents(batch.column(0), f"{path}", self.text_field)
            done += batch.num_rows
            self.pos = base + size * done // rows
        self.pos = base + size


def arrow_documents(column, where: str, field: str) -> Iterator[tuple[str]]:
    """Documents of one arrow text column (None values are skipped)."""
    import pyarrow as pa

    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"{where}: {field!r} is {column.type}, not a string: use --text-field")
    for text in column.to_pylist():
        if text is not None:
            yield (text,)


def _read(stream, path: Path, n: int) -> bytes:
    try:
        return stream.read(n)
    except Exception as e:  # gzip: OSError/EOFError; zstandard.ZstdError is its own type
        raise DataError(f"cannot decompress {path} ({e}): check the file") from None


class _Prefixed(io.RawIOBase):
    """A read-only stream: `head`, then the rest of `stream` (so a sniffed head is not lost)."""

    def __init__(self, head: bytes, stream, path: Path):
        self.head, self.stream, self.path = head, stream, path

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = _read(self.stream, self.path, len(b))
        b[: len(data)] = data
        return len(data)


class _Zstd(io.RawIOBase):
    """A .zst stream of one or more frames; a truncated last frame is an error (zstandard's own
    stream_reader returns nothing for it)."""

    def __init__(self, raw, dctx):
        self.raw, self.dctx, self.obj, self.out = raw, dctx, None, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.out:
            data = self.raw.read(1 << 20)
            if not data:
                if self.obj is not None and not self.obj.eof:
                    raise EOFError("the last zstd frame is cut short")
                return 0
            while data:  # a frame may end inside `data`; the next one starts after it
                if self.obj is None or self.obj.eof:
                    self.obj = self.dctx.decompressobj()
                self.out += self.obj.decompress(data)
                data = self.obj.unused_data if self.obj.eof else b""
        n = min(len(b), len(self.out))
        b[:n], self.out = self.out[:n], self.out[n:]
        return n
