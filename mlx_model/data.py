"""Training data: read text, train or load a tokenizer, pack tokens, draw batches.

No MLX here: everything is numpy, so the data path can be tested (and cached) on its own.
`prepare_data` turns text files (or the English reference text shipped with Python, so it
works offline) into one packed token stream with an end-of-text token after every document,
cached under `cache_dir/<key>/`. `get_batch` draws random windows that depend only on
(seed, step, micro), so a resumed or data-parallel run sees exactly the same data.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from .checkpoint import write_dir

EOS_TOKEN = "<|endoftext|>"
CACHE_VERSION = 2  # 2: BPE tokenizer.json prepends <|endoftext|> for transformers/mlx-lm
VERY_LARGE_INTEGER = int(1e30)  # transformers' "no length limit" value for model_max_length
_DATA_FIX = "pass --data with .txt/.md files, a directory of them, or .jsonl with a 'text' field"
# Tried in order when a tokenizer.json comes without a tokenizer_config.json naming its eos.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


class DataError(ValueError):
    """Bad data or tokenizer input; the message is one line naming the problem and the fix."""


# ---------------------------------------------------------------------------------------------
# Reading text


def _default_corpus() -> list[str]:
    """Python's own pydoc topic texts (~0.5 MB of English), one document per topic."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _expand(paths: list[str]) -> list[tuple[Path, bool]]:
    """(file, explicit) pairs; directories are walked sorted, hidden entries skipped."""
    files: list[tuple[Path, bool]] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append((p, True))
        elif p.is_dir():
            found = []
            for root, dirs, names in os.walk(p):
                dirs[:] = [d for d in dirs if not d.startswith(".")]  # prune hidden dirs
                found += [Path(root) / n for n in names if not n.startswith(".")]
            files += [(f, False) for f in sorted(found)]
        else:
            raise DataError(f"data path {p} does not exist: {_DATA_FIX}")
    return files


def _read_jsonl(path: Path, text: str, text_field: str) -> list[str]:
    """The `text_field` string of each JSON object line; blank lines are skipped."""
    docs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: invalid JSON ({e.msg}): write one JSON object per line"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: not a JSON object: write one JSON object per line")
        if text_field not in obj:
            keys = ", ".join(map(str, list(obj)[:8])) or "none"
            raise DataError(f"{where}: no {text_field!r} field (keys: {keys}): use --text-field")
        if not isinstance(obj[text_field], str):
            raise DataError(f"{where}: {text_field!r} is not a string: store the text as a string")
        docs.append(obj[text_field])
    return docs


def _read_file(path: Path, explicit: bool, text_field: str) -> list[str]:
    """Documents in one file: the whole file, or one per line of a .jsonl file."""
    raw = path.read_bytes()
    if b"\0" in raw[:8192]:
        if not explicit:
            return []  # a binary file inside a data directory: not text, skip it
        raise DataError(f"{path} is a binary file, not text: {_DATA_FIX}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        msg = f"{path} is not UTF-8 (bad byte at offset {e.start})"
        raise DataError(f"{msg}: convert it to UTF-8 or remove it from --data") from None
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text, text_field)
    return [text]


def load_texts(paths: list[str] | None, text_field: str = "text") -> list[str]:
    """Documents from files, directories and .jsonl files; None or [] -> Python's pydoc text.

    Whitespace-only documents are dropped; raises DataError when nothing is left, or on a
    missing path, a binary or non-UTF-8 file, or a bad .jsonl line.
    """
    if not paths:
        return _default_corpus()
    docs = [d for f, explicit in _expand(paths) for d in _read_file(f, explicit, text_field)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"no text found in {', '.join(paths)}: {_DATA_FIX}")
    return docs


# ---------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """A byte-level BPE (`tokenizers`) or sentencepiece tokenizer behind one small interface."""

    def __init__(
        self,
        backend: HFTokenizer | spm.SentencePieceProcessor,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
    ):
        self.backend = backend
        self.is_sentencepiece = isinstance(backend, spm.SentencePieceProcessor)
        if self.is_sentencepiece:
            # sentencepiece reports -1 for a special piece the model does not have
            self.vocab_size = backend.get_piece_size()
            ids = (backend.eos_id(), backend.bos_id(), backend.pad_id())
            self.eos_id, self.bos_id, self.pad_id = (i if i >= 0 else None for i in ids)
            return
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1  # ids need not be contiguous
        eos_token = eos_token or next((t for t in _EOS_CANDIDATES if t in vocab), None)
        shared = eos_token if eos_token == EOS_TOKEN else None  # GPT-2 style: one token for all
        names = (eos_token, bos_token or shared, pad_token or shared)
        self.eos_id, self.bos_id, self.pad_id = (vocab.get(t) for t in names)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""
        if self.is_sentencepiece:
            return self.backend.encode(text)
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` over many texts (in parallel for `tokenizers`)."""
        if self.is_sentencepiece:
            return self.backend.encode(texts)
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; the byte-level BPE gives back exactly the encoded text."""
        if self.is_sentencepiece:
            return self.backend.decode(list(ids))
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def _piece(self, i: int | None) -> str | None:
        if i is None:
            return None
        return self.backend.id_to_piece(i) if self.is_sentencepiece else self.backend.id_to_token(i)

    def fingerprint(self) -> str:
        """sha256 of the tokenizer's full content (used in cache keys)."""
        if self.is_sentencepiece:
            blob = self.backend.serialized_model_proto()
        else:
            blob = self.backend.to_str().encode()
        specials = json.dumps([self.eos_id, self.bos_id, self.pad_id]).encode()
        return hashlib.sha256(blob + specials).hexdigest()

    def save(self, out_dir: str, model_max_length: int | None = None) -> None:
        """Write tokenizer.json (or tokenizer.model) and a tokenizer_config.json that
        transformers' AutoTokenizer and mlx-lm load."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = {
            # transformers 5 maps this class to its `tokenizers` backend; given only a
            # tokenizer.model it builds one that follows the sentencepiece model's own settings
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self._piece(self.eos_id),
            "bos_token": self._piece(self.bos_id),
            "pad_token": self._piece(self.pad_id),
            "model_max_length": model_max_length or VERY_LARGE_INTEGER,
            "clean_up_tokenization_spaces": False,
        }
        if self.is_sentencepiece:
            (out / "tokenizer.model").write_bytes(self.backend.serialized_model_proto())
            unk = self.backend.unk_id()
            config.update(unk_token=self._piece(unk if unk >= 0 else None))
            config.update(add_bos_token=False, add_eos_token=False)
        else:
            self.backend.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        """Load a tokenizer.json, a sentencepiece .model, or a directory holding either."""
        p = Path(path)
        if p.is_dir():
            found = [p / "tokenizer.json", p / "tokenizer.model", *sorted(p.glob("*.model"))]
            p = next((f for f in found if f.is_file()), p / "tokenizer.json")
        fix = "pass --tokenizer with a tokenizer.json, a sentencepiece .model or a dir with one"
        if not p.is_file():
            raise DataError(f"no tokenizer at {path}: {fix}")
        try:
            if p.suffix == ".model":
                return cls(spm.SentencePieceProcessor(model_file=str(p)))
            backend = HFTokenizer.from_file(str(p))
        except Exception as e:  # both libraries raise their own error types
            raise DataError(f"cannot read tokenizer {p} ({type(e).__name__}: {e}): {fix}") from None
        config_file = p.parent / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        names = [config.get(k) for k in ("eos_token", "bos_token", "pad_token")]
        # a special token in tokenizer_config.json is a string or {"content": ...}
        return cls(backend, *(n.get("content") if isinstance(n, dict) else n for n in names))


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE; <|endoftext|> (id 0) is eos, bos and pad. Deterministic."""
    if vocab_size < 256 + 1:
        raise DataError(f"vocab_size {vocab_size} < 257 (256 bytes + {EOS_TOKEN}): raise it")
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown tokens
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # transformers and mlx-lm encode with special tokens: start each text with <|endoftext|>,
    # as documents start in our packed training stream (and as mlx_model.generate does).
    # Our own `encode` passes add_special_tokens=False.
    eos = bpe.token_to_id(EOS_TOKEN)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{EOS_TOKEN} $A",
        pair=f"{EOS_TOKEN} $A {EOS_TOKEN} $B",
        special_tokens=[(EOS_TOKEN, eos)],
    )
    return Tokenizer(bpe, EOS_TOKEN, EOS_TOKEN, EOS_TOKEN)


# ---------------------------------------------------------------------------------------------
# Token stream and cache


def _tokenize(tok: Tokenizer, texts: list[str], chunk: int = 1024) -> np.ndarray:
    """All documents as one uint32 stream, eos after each document."""
    if tok.eos_id is None:
        raise DataError("the tokenizer has no end-of-text token: use a tokenizer with an eos token")
    parts = []
    for i in range(0, len(texts), chunk):
        for ids in tok.encode_batch(texts[i : i + chunk]):
            parts.append(np.asarray(ids + [tok.eos_id], dtype=np.uint32))
    return np.concatenate(parts)


def _cache_key(data: list[str] | None, texts: list[str] | None, *extra: object) -> str:
    """sha256 over what the cached arrays depend on; files enter by path, size and mtime."""
    if data:
        stats = [(f.stat(), str(f.resolve())) for f, _ in _expand(data)]
        source: object = [(name, st.st_size, st.st_mtime_ns) for st, name in stats]
    else:
        source = hashlib.sha256("\0".join(texts or []).encode()).hexdigest()
    blob = json.dumps([CACHE_VERSION, source, *extra])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def prepare_data(
    data: list[str] | None,
    tokenizer: str | None,
    vocab_size: int,
    cache_dir: str,
    val_fraction: float = 0.05,
    text_field: str = "text",
) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """Load text, train (or load) the tokenizer, pack and split tokens; cached on disk.

    The validation split is the last `val_fraction` of the packed stream. Returns
    (tokenizer, train_ids, val_ids) with uint32 ids. A second call with the same inputs
    loads `cache_dir/<key>/` instead of tokenizing (and training) again.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction {val_fraction} is outside [0, 1): pass e.g. 0.05")
    texts = None if data else _default_corpus()
    tok = Tokenizer.load(tokenizer) if tokenizer else None
    tok_id = tok.fingerprint() if tok else f"bpe-{vocab_size}"
    final = Path(cache_dir) / _cache_key(data, texts, tok_id, val_fraction, text_field)
    if final.is_dir():
        train, val = np.load(final / "train.npy"), np.load(final / "val.npy")
        return Tokenizer.load(str(final)), train, val

    texts = texts or load_texts(data, text_field)
    tok = tok or train_tokenizer(texts, vocab_size)
    ids = _tokenize(tok, texts)
    n_val = int(np.ceil(len(ids) * val_fraction))
    train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val :]

    def fill(tmp: Path) -> None:
        tok.save(str(tmp))
        np.save(tmp / "train.npy", train)
        np.save(tmp / "val.npy", val)
        meta = dict(data=data, tokenizer=tokenizer, documents=len(texts), train=len(train))
        (tmp / "meta.json").write_text(json.dumps(meta) + "\n")

    # Built in a temporary directory, renamed into place in one step (a lost race keeps theirs).
    write_dir(final, fill, merge=False)
    return tok, train, val


# ---------------------------------------------------------------------------------------------
# Batches


def _check_length(ids: np.ndarray, seq_len: int, what: str, fix: str) -> None:
    if len(ids) < seq_len + 1:
        msg = f"{what} has {len(ids)} tokens, fewer than one sequence of seq_len+1 = {seq_len + 1}"
        raise DataError(f"{msg}: {fix}")


def get_batch(
    ids: np.ndarray,
    batch_size: int,
    seq_len: int,
    seed: int,
    step: int,
    micro: int = 0,
    rank: int = 0,
    world: int = 1,
) -> np.ndarray:
    """Random windows [batch_size, seq_len + 1] (int32); inputs [:, :-1], targets [:, 1:].

    Depends only on (seed, step, micro): the global batch is batch_size * world windows from
    one generator, and rank r takes rows [r * batch_size, (r + 1) * batch_size).
    """
    _check_length(ids, seq_len, "data", "add more text or lower --seq-len")
    if not 0 <= rank < world:
        raise DataError(f"rank {rank} is outside [0, world={world}): pass 0 <= rank < world")
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(ids) - seq_len, size=batch_size * world)  # global batch
    starts = starts[rank * batch_size : (rank + 1) * batch_size]  # this rank's rows
    window = starts[:, None] + np.arange(seq_len + 1)  # [B, T+1]
    return np.asarray(ids[window], dtype=np.int32)


def eval_batches(
    ids: np.ndarray, batch_size: int, seq_len: int, max_batches: int
) -> list[np.ndarray]:
    """Fixed validation batches of consecutive windows from the start of `ids`.

    Window i holds ids[i*seq_len : i*seq_len + seq_len + 1]: inputs never overlap and every
    token after the first is a target exactly once. The last batch may have fewer rows.
    """
    fix = "add more text, raise --val-fraction or lower --seq-len"
    _check_length(ids, seq_len, "validation data", fix)
    n_windows = min((len(ids) - 1) // seq_len, batch_size * max(max_batches, 1))
    window = np.arange(n_windows)[:, None] * seq_len + np.arange(seq_len + 1)  # [N, T+1]
    rows = np.asarray(ids[window], dtype=np.int32)
    return [rows[i : i + batch_size] for i in range(0, n_windows, batch_size)]
