"""The rooms of `llm` stay rooms: the import contracts in pyproject.toml hold, project imports sit at the top of
each module (a dependency is seen where it is), nothing in `llm/` reaches back into run.py, and no file or class
grows into a hall."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

MODULES = sorted((ROOT / "llm").rglob("*.py"))
MAX_FILE_LINES, MAX_CLASS_LINES = 400, 250


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module]
    return []


def test_import_contracts_hold():
    importlinter_cli = pytest.importorskip("importlinter.cli")
    code = importlinter_cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    assert code == importlinter_cli.EXIT_STATUS_SUCCESS, "an import contract is broken: run `lint-imports`"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_project_imports_are_at_module_level(path):
    """Inside functions only third-party imports (optional or heavy ones), never `llm.*`."""
    hidden = [
        (node.lineno, name)
        for fn in ast.walk(_tree(path))
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
        for name in _imported(node)
        if name == "llm" or name.startswith("llm.")
    ]
    assert not hidden, f"{path.name}: project imports inside functions at lines {hidden}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_reaches_back_into_run_py(path):
    tree = _tree(path)
    names = [name for node in ast.walk(tree) for name in _imported(node)]
    assert "run" not in names and "runpy" not in names, path
    calls = {
        node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    assert not calls & {"spec_from_file_location", "run_path"}, f"{path.name} loads code by file path"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_files_and_classes_stay_small(path):
    lines = path.read_text().count("\n")
    assert lines <= MAX_FILE_LINES, f"{path.name}: {lines} lines; split it by job"
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ClassDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_CLASS_LINES, f"{path.name}: class {node.name} has {length} lines"
