"""tools.stdlib_corpus: which files it takes (sorted, no site-packages, no test suites, no
non-UTF-8 or empty files), that the data pipeline reads its output one document per module, and
bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from mlx_model.sources import Corpus
from tools.stdlib_corpus import write

ROOT = Path(__file__).resolve().parents[1]


def make_root(tmp: Path, rng: np.random.Generator) -> dict[str, str]:
    """A fake standard library; returns the modules the corpus must hold, by relative path."""
    words = ["def", "class", "return", "import", "self", "value", "x", "(", ")", ":", "\n"]
    want = {}
    files = {
        "abc.py": True,
        "zz.py": True,
        "email/parser.py": True,
        "email/mime/text.py": True,
        "site-packages/numpy/core.py": False,
        "dist-packages/thing.py": False,
        "test/test_abc.py": False,
        "email/tests/test_email.py": False,
        "idlelib/idle_test/test_x.py": False,
        ".hidden/mod.py": False,
        "notes.txt": False,
        "empty.py": False,
    }
    for rel, keep in files.items():
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        text = "" if rel == "empty.py" else " ".join(rng.choice(words, 40)) + f"\n# {rel}\n"
        p.write_text(text, encoding="utf-8")
        if keep:
            want[rel] = text
    (tmp / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))  # not UTF-8: skipped
    return want


def test_modules_sorted_filtered_and_read_as_documents(tmp_path):
    rng = np.random.default_rng(0)
    want = make_root(tmp_path / "lib", rng)
    out = tmp_path / "corpus.jsonl"
    n, size = write(out, tmp_path / "lib")
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    # os.walk order with sorted names: a folder's files first, then its sorted sub-folders
    assert [r["path"] for r in rows] == ["abc.py", "zz.py", "email/parser.py", "email/mime/text.py"]
    assert {r["path"]: r["text"] for r in rows} == want
    assert n == len(want) and size == sum(len(t.encode()) for t in want.values())
    docs, cur = [], ""
    for text, ends, _ in Corpus([str(out)]).pieces():
        cur += text
        if ends:
            docs.append(cur)
            cur = ""
    assert docs == [r["text"] for r in rows]
    assert not list(tmp_path.glob(".corpus.jsonl.*"))  # no temporary file left


def test_cli_and_bad_root(tmp_path):
    make_root(tmp_path / "lib", np.random.default_rng(1))
    cmd = [sys.executable, "-m", "tools.stdlib_corpus", "--out", str(tmp_path / "c.jsonl")]
    r = subprocess.run(
        [*cmd, "--root", str(tmp_path / "lib")], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0 and "4 modules" in r.stdout, r.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("no modules here")
    for root in (tmp_path / "missing", tmp_path / "empty"):
        bad = [sys.executable, "-m", "tools.stdlib_corpus", "--out", str(tmp_path / "bad.jsonl")]
        r = subprocess.run([*bad, "--root", str(root)], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: --root"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert not list(tmp_path.glob("*bad.jsonl*"))  # nothing written
