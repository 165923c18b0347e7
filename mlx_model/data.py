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
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from .checkpoint import write_dir
from .data_errors import DataError
from .sources import Corpus
from .store import (
    disk_error,
    open_store,
    progress_bar,
    tokenize_to_file,
    write_meta,
)

__all__ = ["DataError", "Tokenizer", "eval_batches", "get_batch", "load_texts", "prepare_data"]

EOS_TOKEN = "<|endoftext|>"
# 2: BPE tokenizer.json prepends <|endoftext|> for transformers/mlx-lm.
# 3: streaming preparation: one memory-mapped tokens.bin (uint16 when the vocabulary fits) and
#    a BPE trained on a sample of at most TOKENIZER_SAMPLE_BYTES; for the built-in corpus (and
#    any corpus up to that size) the token stream is the same as version 2's.
CACHE_VERSION = 3
TOKENIZER_SAMPLE_BYTES = 32 << 20  # BPE merges for a few thousand tokens settle long before
VERY_LARGE_INTEGER = int(1e30)  # transformers' "no length limit" value for model_max_length
# Tried in order when a tokenizer.json comes without a tokenizer_config.json naming its eos.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


def load_texts(paths: list[str] | None, text_field: str = "text") -> list[str]:
    """All documents of `paths` in memory (see sources.Corpus); None or [] -> pydoc's text.

    For small inputs (evaluation, tests); training streams through `prepare_data` instead.
    Whitespace-only documents are dropped; raises DataError when nothing is left, or on a
    missing path, a binary or non-UTF-8 file, or a bad .jsonl line.
    """
    docs, parts = [], []
    for piece, end, _ in Corpus(paths, text_field).pieces():
        parts.append(piece)
        if end:
            docs.append("".join(parts))
            parts = []
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
        # encode_batch_fast skips character offsets: same ids, less work
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

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


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on an iterable of texts (read once, as a stream);
    <|endoftext|> (id 0) is eos, bos and pad. Deterministic."""
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
    bpe.train_from_iterator(texts, trainer=trainer)
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
# Token store and cache


def _sample(corpus: Corpus, budget: int, progress: bool) -> Iterable[str]:
    """Pieces for tokenizer training: all of a corpus up to `budget` bytes; of a larger one,
    pieces spread evenly over it (by bytes read) adding up to about `budget`."""
    total = corpus.total_bytes()
    with progress_bar("training tokenizer", total, progress) as bar:
        taken = 0
        for piece, _, pos in corpus.pieces():
            bar.update(pos - bar.n)
            if total is not None and total > budget and taken > pos * budget / total:
                continue  # not this one: keep the sample spread over the corpus
            yield piece
            taken += len(piece)
            if total is None and taken >= budget:
                return  # a stream of unknown size: its first `budget` bytes


def _cache_key(corpus: Corpus, *extra: object) -> str:
    """sha256 over what the cached stream depends on; files enter by path, size and mtime."""
    blob = json.dumps([CACHE_VERSION, corpus.signature(), *extra], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def prepare_data(
    data: list[str] | None,
    tokenizer: str | None,
    vocab_size: int,
    cache_dir: str,
    val_fraction: float = 0.05,
    text_field: str = "text",
    progress: bool = False,
) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """Stream the text through the tokenizer into a token store; cached on disk.

    Trains a BPE on a sample of the corpus unless `tokenizer` is given. The validation split
    is the last `val_fraction` of the packed stream. Returns (tokenizer, train_ids, val_ids):
    read-only memory-mapped views (uint16 when the vocabulary fits, else uint32). A second
    call with the same inputs opens `cache_dir/<key>/` instead of reading the text again.
    Memory stays bounded whatever the corpus size; `progress` draws bars on stderr.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction {val_fraction} is outside [0, 1): pass e.g. 0.05")
    corpus = Corpus(data, text_field)
    tok = Tokenizer.load(tokenizer) if tokenizer else None
    tok_id = tok.fingerprint() if tok else f"bpe-{vocab_size}-{TOKENIZER_SAMPLE_BYTES}"
    final = Path(cache_dir) / _cache_key(corpus, tok_id, val_fraction)
    if final.is_dir():
        return (Tokenizer.load(str(final)), *open_store(final))

    tok = tok or train_tokenizer(_sample(corpus, TOKENIZER_SAMPLE_BYTES, progress), vocab_size)

    def fill(tmp: Path) -> None:
        ids, documents = tokenize_to_file(tok, corpus, tmp, progress)
        n = len(ids)
        n_val = int(np.ceil(n * val_fraction))
        try:
            tok.save(str(tmp))
        except OSError as e:
            raise disk_error(tmp, e) from None
        meta = dict(
            dtype=ids.dtype.name, tokens=n, train=n - n_val, documents=documents,
            data=data, tokenizer=tokenizer, text_field=text_field,
        )  # fmt: skip
        write_meta(tmp, meta)

    # Built in a temporary directory, renamed into place in one step (a lost race keeps theirs):
    # a killed or failed preparation leaves no directory under the final name (and the next
    # preparation on this host removes the temporary one a killed writer left).
    write_dir(final, fill, merge=False)
    return tok, *open_store(final)


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
    return list(window_batches(ids, batch_size, seq_len, max_batches))


def window_batches(
    ids: np.ndarray, batch_size: int, seq_len: int, max_batches: int = 10**18
) -> Iterator[np.ndarray]:
    """eval_batches one batch at a time: only the batch being scored is in memory (`ids` may
    be a memory map of any length)."""
    fix = "add more text, raise --val-fraction or lower --seq-len"
    _check_length(ids, seq_len, "validation data", fix)
    n_windows = min((len(ids) - 1) // seq_len, batch_size * max(max_batches, 1))
    for i in range(0, n_windows, batch_size):
        rows = np.arange(i, min(i + batch_size, n_windows))
        window = rows[:, None] * seq_len + np.arange(seq_len + 1)  # [b, T+1]
        yield np.asarray(ids[window], dtype=np.int32)
