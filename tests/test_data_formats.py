"""Data formats and Hugging Face datasets as training data: .jsonl.gz/.zst, .parquet,
save_to_disk directories, and hf: names read offline from a datasets cache built here.
Nothing downloads: every dataset is made by the test (HF_DATASETS_OFFLINE=1)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_model import data, speedups
from mlx_model.data import DataError, load_texts

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")
zstandard = pytest.importorskip("zstandard")

ROOT = Path(__file__).resolve().parents[1]


def random_docs(seed: int, n: int = 30) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyzé"), 5)) for _ in range(200)]
    return [" ".join(rng.choice(words, int(rng.integers(5, 60)))) + "." for _ in range(n)]


def jsonl(docs: list[str]) -> bytes:
    return "".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)).encode()


def write_parquet(path: Path, docs: list[str], **extra) -> None:
    table = {"id": list(range(len(docs))), "body": docs, **extra}
    pq.write_table(pa.table(table), path, row_group_size=7)  # several row groups


def hub_cache(root: Path, name: str, splits: dict[str, list[str]]) -> Path:
    """A datasets cache as an online `load_dataset(name)` leaves it (built from local parquet
    files, then moved to the directory a hub dataset uses), for offline loading."""
    cache = root / "hf_cache"
    files = {}
    for split, docs in splits.items():
        write_parquet(root / f"{split}.parquet", docs)
        files[split] = str(root / f"{split}.parquet")
    datasets.load_dataset("parquet", data_files=files, cache_dir=str(cache))
    speedups.reapply()  # datasets re-exports os.environ: keep this process's kernels private
    built = next(p for p in (cache / "parquet").glob("*/*/*") if p.is_dir())
    owner, short = name.split("/")
    dest = cache / f"{owner}___{short}" / "default" / built.parts[-2] / built.parts[-1]
    dest.parent.mkdir(parents=True)
    shutil.move(built, dest)
    for f in dest.glob("parquet-*"):
        f.rename(dest / f.name.replace("parquet-", f"{short}-"))
    return cache


@pytest.fixture
def offline(tmp_path: Path, monkeypatch) -> Path:
    """HF_DATASETS_OFFLINE with an empty datasets cache under tmp_path (this process only)."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_every_format_reads_the_same_documents(tmp_path: Path, offline: Path):
    docs = random_docs(1)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl(docs)))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(docs)))
    write_parquet(tmp_path / "a.parquet", docs + [None])  # a null row is skipped
    ds = datasets.Dataset.from_dict({"body": docs})
    ds.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict(validation=ds, train=ds.select(range(5))).save_to_disk(
        str(tmp_path / "dict")
    )
    hub_cache(tmp_path, "someone/tiny_corpus", {"train": docs[:4], "validation": docs})
    for spec, expect in [
        ("a.jsonl.gz", docs),
        ("a.jsonl.zst", docs),
        ("a.parquet", docs),
        ("disk", docs),
        ("dict", docs[:5]),  # a DatasetDict: its train split
        ("dict/validation", docs),
        ("hf:someone/tiny_corpus", docs[:4]),
        ("hf:someone/tiny_corpus::validation", docs),
        ("hf:someone/tiny_corpus:default:validation", docs),
    ]:
        path = spec if spec.startswith("hf:") else str(tmp_path / spec)
        assert load_texts([path], text_field="body") == expect, spec
    # a directory mixes them; a .gz of plain text is one document
    (tmp_path / "mix").mkdir()
    shutil.copy(tmp_path / "a.parquet", tmp_path / "mix" / "1.parquet")
    (tmp_path / "mix" / "2.txt.gz").write_bytes(gzip.compress(docs[0].encode()))
    assert load_texts([str(tmp_path / "mix")], "body") == docs + [docs[0]]


def test_prepare_from_a_dataset_equals_the_same_text_files(tmp_path: Path):
    docs = random_docs(2)
    ds = datasets.Dataset.from_dict({"text": docs})
    ds.save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "files").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "files" / f"{i:02d}.txt").write_text(d)
    a = data.prepare_data([str(tmp_path / "disk")], None, 300, str(tmp_path / "k"))
    b = data.prepare_data([str(tmp_path / "files")], None, 300, str(tmp_path / "k"))
    assert a[0].fingerprint() == b[0].fingerprint()
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    assert len(list((tmp_path / "k").iterdir())) == 2  # two sources, two cache entries


@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda p: write_parquet(p / "x.parquet", ["a"]), ["x.parquet", "no 'text' field", "body"]),
        (lambda p: write_parquet(p / "x.parquet", ["a"], text=[1]), ["'text' is int64"]),
        (lambda p: (p / "x.parquet").write_bytes(b"PAR1 not really"), ["not a parquet file"]),
        (lambda p: (p / "x.jsonl.gz").write_bytes(b"\x1f\x8b\x08junk"), ["cannot decompress"]),
        (lambda p: (p / "x.jsonl.zst").write_bytes(b"(\xb5/\xfdjunk"), ["cannot decompress"]),
        (
            lambda p: datasets.Dataset.from_dict({"body": ["a"]}).save_to_disk(str(p / "x")),
            ["no 'text' field", "body"],
        ),
        (
            lambda p: datasets.Dataset.from_dict(
                {"text": []}, datasets.Features({"text": datasets.Value("string")})
            ).save_to_disk(str(p / "x")),
            ["cannot open dataset"],  # datasets 5.2 cannot load a 0-row save_to_disk
        ),
        (
            lambda p: datasets.Dataset.from_dict({"text": [" ", None, "\n"]}).save_to_disk(
                str(p / "x")
            ),
            ["no text found"],
        ),
        (
            lambda p: pq.write_table(pa.table({"text": pa.array([], pa.string())}), p / "x.pq"),
            ["no text found"],
        ),
        (
            lambda p: datasets.DatasetDict(
                a=datasets.Dataset.from_dict({"text": ["x"]}),
                b=datasets.Dataset.from_dict({"text": ["y"]}),
            ).save_to_disk(str(p / "x")),
            ["splits a, b", "no train split"],
        ),
    ],
)
def test_bad_sources_raise_one_line(tmp_path: Path, make, expect):
    make(tmp_path)
    path = next(p for p in tmp_path.iterdir() if p.name.startswith("x"))
    with pytest.raises(DataError) as err:
        data.prepare_data([str(path)], None, 300, str(tmp_path / "k"))
    msg = str(err.value)
    assert "\n" not in msg and ": " in msg, msg
    for part in expect:
        assert part in msg, msg
    assert not (tmp_path / "k").exists() or list((tmp_path / "k").iterdir()) == []


def test_hub_names_offline(tmp_path: Path, offline: Path):
    hub_cache(tmp_path, "someone/tiny_corpus", {"train": random_docs(3)})
    for spec, words in [
        ("hf:nobody/not_cached", ["cannot load hf:nobody/not_cached", "no network access"]),
        ("hf:someone/tiny_corpus::test", ["cannot load", "test"]),
        ("hf:", ["bad dataset name", "hf:NAME[:CONFIG][:SPLIT]"]),
    ]:
        with pytest.raises(DataError) as err:
            load_texts([spec])
        msg = str(err.value)
        assert "\n" not in msg and all(w in msg for w in words), msg
    with pytest.raises(DataError, match="no 'text' field.*body"):
        load_texts(["hf:someone/tiny_corpus"])  # its text is in "body"


def test_train_cli_on_parquet_save_to_disk_and_hub_offline(tmp_path: Path):
    docs = random_docs(4, n=400)
    write_parquet(tmp_path / "a.parquet", docs[:150])
    datasets.Dataset.from_dict({"body": docs[150:300]}).save_to_disk(str(tmp_path / "disk"))
    cache = hub_cache(tmp_path, "someone/tiny_corpus", {"train": docs[300:]})
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env["HF_DATASETS_CACHE"] = str(cache)
    srcs = [str(tmp_path / "a.parquet"), str(tmp_path / "disk"), "hf:someone/tiny_corpus"]
    args = ["--preset", "tiny", "--max-steps", "1", "--progress", "false", "--seq-len", "16"]
    args += ["--data", *srcs, "--text-field", "body", "--cache-dir", str(tmp_path / "k")]
    r = subprocess.run(
        [sys.executable, "-m", "mlx_model.train", *args, "--out", str(tmp_path / "o")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "o" / "model.safetensors").is_file()
    (entry,) = (tmp_path / "k").iterdir()
    assert json.loads((entry / "meta.json").read_text())["documents"] == len(docs)
