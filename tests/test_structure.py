"""Structure rules that keep the codebase easy to follow, checked on the source itself.

- Every command-line flag of every CLI has help text (the parser each `main()` builds is captured
  just before it parses, so the test sees exactly what `--help` prints, subcommands included).
- No two modules of the project define the same top-level function name with the same body
  (one concept, one place); the MLX model and its torch twin are independent on purpose and are
  compared only against themselves.
- No import cycle among the modules of mlx_model/, torch_reference/ and tools/ (read with `ast`;
  imports inside functions count), and the name-mapping layer (hf.py) never imports the
  checkpoint layer.
"""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mlx_model", "torch_reference", "tools")


def _entry_points() -> list[str]:
    """Every `python -m X` entry point of the project: each module with a main() that runs
    when the module is run as a program."""
    found = []
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).glob("*.py")):
            text = f.read_text()
            if "\ndef main(" in text and 'if __name__ == "__main__":\n    main(' in text:
                found.append(f"{pkg}.{f.stem}")
    return found


CLIS = _entry_points()


def test_entry_points_are_found():
    """The discovery above cannot silently find nothing: the documented CLIs are among them."""
    documented = {"mlx_model.train", "mlx_model.generate", "mlx_model.evaluate", "tools.convert"}
    documented |= {"tools.bench", "tools.plot", "tools.compare", "mlx_model.mtp_distill"}
    assert documented <= set(CLIS), sorted(documented - set(CLIS))


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


# ------------------------------------------------------------------- import cycles
def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules that `name` imports anywhere in its body (in functions too)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1 packages
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            # `from pkg import sub` imports the submodule sub; `from mod import f` imports mod
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
            ]
        else:
            continue
        out.update(t for t in targets if t in mods and t != name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m) :] + [m]
            if m not in state and (found := visit(m)) is not None:
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)) is not None:
            return found
    return None


def test_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_relative_imports_resolve(tmp_path):
    mods = {"p": tmp_path / "__init__.py", "p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py"}
    mods["p.a"].write_text("def f():\n    from . import b\n    from .b import g\n")
    mods["p"].write_text("from .a import f\n")
    assert imports_of("p.a", mods["p.a"], mods) == {"p.b"}
    assert imports_of("p", mods["p"], mods) == {"p.a"}


def test_no_import_cycle():
    mods = project_modules()
    assert {"mlx_model.checkpoint", "mlx_model.hf", "tools.convert"} <= set(mods)
    graph = {name: imports_of(name, path, mods) for name, path in mods.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_mapping_layer_never_imports_the_checkpoint_layer():
    mods = project_modules()
    assert imports_of("mlx_model.hf", mods["mlx_model.hf"], mods) == {"mlx_model.config"}
    assert imports_of("mlx_model.config", mods["mlx_model.config"], mods) == set()
