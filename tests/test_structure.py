"""Structure rules that keep the codebase easy to follow, checked on the source itself.

- Every command-line flag of every CLI has help text (the parser each `main()` builds is captured
  just before it parses, so the test sees exactly what `--help` prints, subcommands included).
- No two modules of the project define the same top-level function name with the same body
  (one concept, one place); the MLX model and its torch twin are independent on purpose and are
  compared only against themselves.
"""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Every `python -m X` entry point of the project.
CLIS = [
    "mlx_model.train",
    "mlx_model.generate",
    "mlx_model.evaluate",
    "tools.convert",
    "tools.bench",
    "tools.plot",
]
CLIS += [m for m in ("tools.compare",) if (ROOT / (m.replace(".", "/") + ".py")).exists()]


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _captured_parser(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser `module.main()` builds, taken at its first parse call (nothing else runs)."""

    def grab(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", grab)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    mod = importlib.import_module(module)
    with pytest.raises(_Captured) as got:
        mod.main(["--help"])
    return got.value.parser


def _missing_help(parser: argparse.ArgumentParser, where: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _missing_help(sub, f"{where} {name}")
            continue
        if not action.help or action.help == argparse.SUPPRESS:
            flag = "/".join(action.option_strings) or action.dest
            missing.append(f"{where}: {flag}")
    return missing


@pytest.mark.parametrize("module", CLIS)
def test_every_cli_flag_has_help(module, monkeypatch):
    parser = _captured_parser(module, monkeypatch)
    assert len(parser._actions) > 1, f"{module}: no flags captured"
    missing = _missing_help(parser, f"python -m {module}")
    assert not missing, "flags without help text:\n" + "\n".join(missing)


def _functions(path: Path) -> dict[str, str]:
    """Top-level function name -> its body's AST dump (docstring dropped, names kept)."""
    tree = ast.parse(path.read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]
            out[node.name] = ast.dump(ast.Module(body=body, type_ignores=[]))
    return out


def test_no_function_defined_twice():
    """The same top-level function (same name and same body) in two modules of one side."""
    sides = {
        "mlx_model + tools": list((ROOT / "mlx_model").glob("*.py"))
        + list((ROOT / "tools").glob("*.py")),
        "torch_reference": list((ROOT / "torch_reference").glob("*.py")),
    }
    dupes = []
    for side, files in sides.items():
        seen: dict[tuple[str, str], Path] = {}
        for f in sorted(files):
            for name, body in _functions(f).items():
                if name == "main":  # every CLI has one; their bodies differ anyway
                    continue
                key = (name, body)
                if key in seen:
                    dupes.append(f"{side}: {name} in {seen[key].name} and {f.name}")
                seen[key] = f
    assert not dupes, "\n".join(dupes)
