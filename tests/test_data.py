"""Tests for mlx_model/data.py: text loading, tokenizers, the token cache and batch sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlx_model import data
from mlx_model.data import DataError, Tokenizer, eval_batches, get_batch, load_texts

# ASCII words plus accents, Greek, CJK, emoji and odd whitespace: exercises every byte path.
ALPHABET = list("abcdefghij klmnop  qrstuvwxyz.,;!?\n\t") + list("éüßñøΩλ日本語🙂€\u00a0")


def random_text(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(ALPHABET, size=n))


def random_docs(seed: int, n_docs: int = 40, length: int = 300) -> list[str]:
    rng = np.random.default_rng(seed)
    return [random_text(rng, int(rng.integers(length // 2, length))) for _ in range(n_docs)]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return data.train_tokenizer(random_docs(0), vocab_size=320)


# ---------------------------------------------------------------------------------------------
# load_texts


def test_default_corpus_is_large_and_ordered():
    from pydoc_data.topics import topics

    docs = load_texts(None)
    assert docs == load_texts([])
    assert sum(map(len, docs)) > 100_000  # pydoc topics: ~0.5 MB of English
    assert docs == [topics[k] for k in sorted(topics)]


def test_load_dir_jsonl_and_txt(tmp_path: Path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_text("bee text")
    (root / "a.md").write_text("# a heading")
    (root / "sub" / "c.py").write_text("print('c')\n")
    (root / "sub" / "blank.txt").write_text("  \n\n")  # whitespace only: dropped
    (root / ".hidden.txt").write_text("hidden")
    (root / ".git" / "config").write_text("hidden dir")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")  # binary in a dir: skipped
    lines = [json.dumps({"text": "first doc", "id": 1}), "", json.dumps({"text": "second ü"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "e.rst").write_text("\ufeffbom text")  # a UTF-8 byte order mark is dropped
    docs = load_texts([str(root), str(tmp_path / "d.jsonl"), str(tmp_path / "e.rst")])
    assert docs == ["# a heading", "bee text", "print('c')\n", "first doc", "second ü", "bom text"]


def test_jsonl_other_field(tmp_path: Path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    assert load_texts([str(tmp_path / "x.jsonl")], text_field="body") == ["hello"]


@pytest.mark.parametrize(
    "name, content, expect",
    [
        ("missing.txt", None, ["missing.txt", "does not exist", "--data"]),
        ("empty.txt", b"   \n\t\n", ["no text found", "empty.txt", "--data"]),
        ("blob.bin", b"abc\0\1\2def", ["blob.bin", "binary", "--data"]),
        ("latin1.txt", "café crème".encode("latin-1"), ["latin1.txt", "UTF-8", "convert"]),
        (
            "nofield.jsonl",
            b'{"text": "ok"}\n{"body": "x"}\n',
            ["nofield.jsonl:2", "'text'", "body"],
        ),
        ("badline.jsonl", b'{"text": "ok"}\n{"text": \n', ["badline.jsonl:2", "invalid JSON"]),
        ("list.jsonl", b'["a", "b"]\n', ["list.jsonl:1", "not a JSON object"]),
        ("notstr.jsonl", b'{"text": 5}\n', ["notstr.jsonl:1", "not a string"]),
    ],
)
def test_bad_inputs_raise_useful_errors(tmp_path: Path, name, content, expect):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_texts([str(path)])
    msg = str(err.value)
    assert "\n" not in msg and ": " in msg, msg  # one line: problem, then the fix
    for part in expect:
        assert part in msg, msg


def test_empty_directory_raises(tmp_path: Path):
    with pytest.raises(DataError, match="no text found"):
        load_texts([str(tmp_path)])


# ---------------------------------------------------------------------------------------------
# Byte-level BPE


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bpe_round_trip_exact(bpe: Tokenizer, seed: int):
    # Fresh text, with characters the tokenizer may never have seen as whole tokens.
    rng = np.random.default_rng(seed)
    text = random_text(rng, 2000) + "".join(chr(int(c)) for c in rng.integers(0x100, 0x3000, 50))
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.encode_batch([text, "x"]) == [ids, bpe.encode("x")]


def test_bpe_specials_and_vocab(bpe: Tokenizer):
    assert bpe.eos_id == bpe.bos_id == bpe.pad_id == 0
    assert bpe.decode([0]) == data.EOS_TOKEN
    assert 257 <= bpe.vocab_size <= 320
    assert len(bpe.encode("abc abc abc")) < len("abc abc abc")  # merges were learned


def test_bpe_training_is_deterministic(bpe: Tokenizer):
    again = data.train_tokenizer(random_docs(0), vocab_size=320)
    assert again.backend.to_str() == bpe.backend.to_str()


def test_vocab_too_small_raises():
    with pytest.raises(DataError, match="257"):
        data.train_tokenizer(["some text"], vocab_size=256)


def test_hf_save_load_round_trip(bpe: Tokenizer, tmp_path: Path):
    bpe.save(str(tmp_path), model_max_length=128)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == data.EOS_TOKEN and config["model_max_length"] == 128
    text = random_text(np.random.default_rng(4), 500)
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        tok = Tokenizer.load(str(path))
        assert tok.encode(text) == bpe.encode(text)
        assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id) == (bpe.vocab_size, 0, 0, 0)
        assert tok.fingerprint() == bpe.fingerprint()


def test_transformers_loads_saved_bpe(bpe: Tokenizer, tmp_path: Path):
    import transformers

    bpe.save(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token_id == hf.bos_token_id == hf.pad_token_id == bpe.eos_id
    for seed in (5, 6):
        text = random_text(np.random.default_rng(seed), 800)
        ids = bpe.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        # with special tokens (the default) a text starts with <|endoftext|>, as in training
        assert hf.encode(text) == [bpe.bos_id] + ids
        assert hf.decode(ids) == bpe.decode(ids) == text


# ---------------------------------------------------------------------------------------------
# sentencepiece


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("sp")
    rng = np.random.default_rng(8)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, size=rng.integers(2, 8))) for _ in range(300)]
    lines = [" ".join(rng.choice(words, size=12)) for _ in range(600)]
    (root / "train.txt").write_text("\n".join(lines))
    prefix = str(root / "sp")
    spm.SentencePieceTrainer.train(
        input=str(root / "train.txt"), model_prefix=prefix, vocab_size=100, minloglevel=2
    )
    return Path(prefix + ".model")


def sp_text(seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(
        "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=5)) for _ in range(30)
    )


def test_sentencepiece_save_load_round_trip(sp_model: Path, tmp_path: Path):
    tok = Tokenizer.load(str(sp_model))
    assert tok.is_sentencepiece and tok.vocab_size == 100
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)  # sentencepiece defaults
    text = sp_text(9)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    tok.save(str(tmp_path))
    assert (tmp_path / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    again = Tokenizer.load(str(tmp_path))
    assert again.encode(text) == ids and again.eos_id == tok.eos_id


def test_transformers_loads_saved_sentencepiece(sp_model: Path, tmp_path: Path):
    import google.protobuf  # noqa: F401  (transformers reads the .model proto with it)
    import transformers

    tok = Tokenizer.load(str(sp_model))
    tok.save(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.eos_token_id, hf.bos_token_id) == (tok.eos_id, tok.bos_id)
    # leading, doubled and trailing spaces and newlines follow sentencepiece's own normalizer
    for text in (sp_text(10), "  " + sp_text(11).replace(" ", "  ", 3) + " \n" + sp_text(12)):
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == tok.decode(ids)


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_mlx_lm_loads_saved_tokenizer(kind: str, request, tmp_path: Path):
    from mlx_lm import tokenizer_utils

    if kind == "bpe":
        tok, text = request.getfixturevalue("bpe"), random_text(np.random.default_rng(7), 300)
    else:
        tok, text = Tokenizer.load(str(request.getfixturevalue("sp_model"))), sp_text(7)
    tok.save(str(tmp_path))
    wrapper = tokenizer_utils.load(tmp_path)
    assert wrapper.encode(text, add_special_tokens=False) == tok.encode(text)
    # our BPE starts a text with <|endoftext|> (as training documents start); sentencepiece
    # configs keep add_bos_token false
    assert wrapper.encode(text) == ([tok.bos_id] if kind == "bpe" else []) + tok.encode(text)
    assert wrapper.eos_token_ids == {tok.eos_id}
    assert wrapper.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_load_missing_tokenizer_raises(tmp_path: Path):
    with pytest.raises(DataError, match="--tokenizer"):
        Tokenizer.load(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read tokenizer"):
        Tokenizer.load(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# prepare_data and its cache


def write_docs(root: Path, docs: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (root / f"doc{i:03d}.txt").write_text(doc)


def test_prepare_data_packs_splits_and_caches(tmp_path: Path, monkeypatch):
    docs = random_docs(13, n_docs=30)
    write_docs(tmp_path / "corpus", docs)
    args = ([str(tmp_path / "corpus")], None, 300, str(tmp_path / "cache"))
    tok, train, val = data.prepare_data(*args, val_fraction=0.1)
    stream = np.concatenate([train, val])
    assert train.dtype == val.dtype == np.uint16  # the vocabulary fits
    assert len(val) == int(np.ceil(len(stream) * 0.1))
    # Packed: each document's ids followed by eos, in file order, no padding.
    expected = [i for d in docs for i in tok.encode(d) + [tok.eos_id]]
    assert stream.tolist() == expected
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []

    # A second call must load the cache, not train again.
    def no_training(*a, **k):
        raise AssertionError("train_tokenizer called despite a cache hit")

    monkeypatch.setattr(data, "train_tokenizer", no_training)
    tok2, train2, val2 = data.prepare_data(*args, val_fraction=0.1)
    assert np.array_equal(train2, train) and np.array_equal(val2, val)
    assert tok2.fingerprint() == tok.fingerprint()

    # Any change of inputs is a new key: another val_fraction, or an edited file.
    with pytest.raises(AssertionError, match="cache hit"):
        data.prepare_data(*args, val_fraction=0.2)
    (tmp_path / "corpus" / "doc000.txt").write_text(docs[0] + " more text")
    with pytest.raises(AssertionError, match="cache hit"):
        data.prepare_data(*args, val_fraction=0.1)


def test_prepare_data_default_corpus(tmp_path: Path):
    tok, train, val = data.prepare_data(None, None, 400, str(tmp_path), val_fraction=0.05)
    assert tok.vocab_size == 400 and len(train) > 50_000 and len(val) > 2_000
    n_docs = len(load_texts(None))
    assert int((train == tok.eos_id).sum() + (val == tok.eos_id).sum()) == n_docs
    cached = data.prepare_data(None, None, 400, str(tmp_path), val_fraction=0.05)
    assert np.array_equal(cached[1], train) and len(list(tmp_path.iterdir())) == 1


def test_prepare_data_with_given_tokenizer(sp_model: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(data, "train_tokenizer", None)  # must not be used
    docs = [sp_text(s) for s in range(14, 24)]
    write_docs(tmp_path / "corpus", docs)
    tok, train, val = data.prepare_data(
        [str(tmp_path / "corpus")], str(sp_model), 123, str(tmp_path / "cache"), 0.2
    )
    assert tok.is_sentencepiece
    expected = [i for d in docs for i in tok.encode(d) + [tok.eos_id]]
    assert np.concatenate([train, val]).tolist() == expected
    with pytest.raises(DataError, match="val_fraction"):
        data.prepare_data(None, str(sp_model), 123, str(tmp_path / "cache"), val_fraction=1.0)


# ---------------------------------------------------------------------------------------------
# Batches


def test_get_batch_windows_and_determinism():
    ids = np.arange(1000, dtype=np.uint32)
    b = get_batch(ids, batch_size=4, seq_len=16, seed=0, step=3, micro=1)
    assert b.shape == (4, 17) and b.dtype == np.int32
    assert (np.diff(b, axis=1) == 1).all()  # each row is a contiguous window of ids
    assert np.array_equal(b, get_batch(ids, 4, 16, seed=0, step=3, micro=1))
    for other in (
        dict(seed=1, step=3, micro=1),
        dict(seed=0, step=4, micro=1),
        dict(seed=0, step=3, micro=0),
    ):
        assert not np.array_equal(b, get_batch(ids, 4, 16, **other))
    # every start position is reachable, including the last full window
    starts = np.concatenate([get_batch(ids[:20], 64, 16, 0, s)[:, 0] for s in range(20)])
    assert set(starts.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("world", [2, 4])
def test_get_batch_rank_sharding(world: int):
    rng = np.random.default_rng(world)
    ids = rng.integers(0, 50_000, size=5000).astype(np.uint32)
    full = get_batch(ids, 3 * world, 32, seed=7, step=11, micro=2)
    shards = [
        get_batch(ids, 3, 32, seed=7, step=11, micro=2, rank=r, world=world) for r in range(world)
    ]
    assert np.array_equal(np.concatenate(shards), full)
    with pytest.raises(DataError, match="rank"):
        get_batch(ids, 3, 32, 7, 11, rank=world, world=world)


def test_get_batch_too_little_data():
    with pytest.raises(DataError, match="fewer than one sequence.*--seq-len"):
        get_batch(np.arange(16), 2, seq_len=16, seed=0, step=0)
    assert get_batch(np.arange(17), 2, seq_len=16, seed=0, step=0).shape == (2, 17)


@pytest.mark.parametrize(
    "n, seq_len, batch, max_batches",
    [(1000, 16, 4, 3), (100, 8, 4, 100), (9, 8, 4, 2), (50, 7, 3, 0)],
)
def test_eval_batches_cover_val_once(n, seq_len, batch, max_batches):
    ids = np.arange(n, dtype=np.uint32)
    batches = eval_batches(ids, batch, seq_len, max_batches)
    n_windows = min((n - 1) // seq_len, batch * max(max_batches, 1))
    assert 1 <= len(batches) <= max(max_batches, 1)
    assert all(b.shape[0] == batch for b in batches[:-1]) and 1 <= batches[-1].shape[0] <= batch
    rows = np.concatenate(batches)
    assert rows.dtype == np.int32 and rows.shape == (n_windows, seq_len + 1)
    # inputs tile the stream from the start; every target is predicted exactly once
    assert rows[:, :-1].ravel().tolist() == list(range(n_windows * seq_len))
    assert rows[:, 1:].ravel().tolist() == list(range(1, n_windows * seq_len + 1))
    again = eval_batches(ids, batch, seq_len, max_batches)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))


def test_eval_batches_too_little_data():
    with pytest.raises(DataError, match="validation data has 8 tokens.*--val-fraction"):
        eval_batches(np.arange(8), 2, 8, 4)
