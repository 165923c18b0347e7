"""A larger offline corpus: the Python standard library's own source, one document per module.

    python -m tools.stdlib_corpus --out data/stdlib.jsonl

Every Python installation ships its standard library as `.py` files (~13 MB of code, docstrings
and comments for CPython 3.11, against ~0.8 MB of text in the built-in `pydoc_data` corpus), so
this gives experiments a corpus that a 500-step run of the `small` preset sees about once
instead of ten times, with no download. Files are taken in sorted path order from
`sysconfig.get_paths()["stdlib"]`, skipping `site-packages`/`dist-packages` (not the standard
library), the test suites (`test`, `tests`, `idle_test`), and files that are not UTF-8.
The output is JSON Lines, `{"text": ..., "path": ...}` per module (what `--data` reads, one
document each); the last line printed says how many modules and bytes, and the Python version,
since the corpus differs between versions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def modules(root: Path) -> Iterator[tuple[str, str]]:
    """(relative path, text) of every standard-library module under root, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                yield str(path.relative_to(root)), text


def write(out: Path, root: Path) -> tuple[int, int]:
    """Write the corpus atomically (a temporary sibling renamed); return (modules, bytes).
    ValueError (nothing written) when root holds no module."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    n = size = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rel, text in modules(root):
                f.write(json.dumps({"text": text, "path": rel}) + "\n")
                n += 1
                size += len(text.encode("utf-8"))
        if n == 0:
            raise ValueError(
                f"--root {root}: no .py modules found; name the standard library folder"
            )
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n, size


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tools.stdlib_corpus", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, help="output .jsonl path")
    p.add_argument(
        "--root",
        default=sysconfig.get_paths()["stdlib"],
        help="standard library folder (default: this Python's)",
    )
    a = p.parse_args(argv)
    root = Path(a.root)
    if not root.is_dir():
        print(
            f"error: --root {root}: not a folder; name the standard library folder", file=sys.stderr
        )
        raise SystemExit(2)
    try:
        n, size = write(Path(a.out), root)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    v = sys.version_info
    print(
        f"{a.out}: {n} modules, {size / 1e6:.1f} MB (Python {v.major}.{v.minor}.{v.micro}, {root})"
    )


if __name__ == "__main__":
    main()
