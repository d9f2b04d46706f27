"""One source: a solution notebook calls the scenario code the tests prove instead of re-writing it.

A function defined in a notebook (outside the exercise cells, whose code *is* the exercise) fails this test
when it has the name of a function exported by a scenario module the notebook imports and does not delegate to
the scenario, or when its syntax tree is a near copy of any scenario function (renamed variables do not hide it:
identifiers are not compared, only the shape of the code and the names of what it calls).
"""
from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import pkgutil
import textwrap
from pathlib import Path

import nbformat
import pytest

import course_lib.scenarios

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted(p for p in (ROOT / "solutions").glob("*/*.ipynb") if p.parent.name == p.stem)
MIN_NODES = 30        # smaller functions (a two-line wrapper) are not copies worth flagging
MAX_SIMILARITY = 0.7  # difflib ratio of the shapes (measured: copies 0.71-0.82, wrappers and other code <= 0.62)


def _shape(fn: ast.AST) -> list[str]:
    """The node types of a function body in order, with the attribute and function names it calls."""
    out = []
    for node in ast.walk(fn):
        if isinstance(node, (ast.Load, ast.Store, ast.Del)):
            continue
        out.append(type(node).__name__)
        if isinstance(node, ast.Attribute):
            out.append("." + node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            out.append(node.func.id + "()")
    return out


def scenario_functions() -> dict[str, list[str]]:
    """``{"module.name": shape}`` for every function in a scenario module's ``__all__``."""
    out = {}
    for info in pkgutil.iter_modules(course_lib.scenarios.__path__):
        module = importlib.import_module(f"course_lib.scenarios.{info.name}")
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if inspect.isfunction(obj) and obj.__module__ == module.__name__:
                tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
                out[f"{info.name}.{name}"] = _shape(tree.body[0])
    return out


def _code_cells(path: Path):
    """``(index, cell, parsed body)`` of the notebook's code cells (IPython magics dropped)."""
    for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
        if cell.cell_type != "code":
            continue
        source = "\n".join(ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("%", "!")))
        try:
            yield i, cell, ast.parse(source).body
        except SyntaxError:
            continue


def notebook_functions(path: Path) -> list[tuple[int, ast.FunctionDef]]:
    """Top-level functions of the notebook's code cells, except exercise (solution) and graded test cells."""
    out = []
    for i, cell, body in _code_cells(path):
        meta = cell.metadata.get("nbgrader", {})
        if not (meta.get("solution") or meta.get("grade")):
            out += [(i, n) for n in body if isinstance(n, ast.FunctionDef)]
    return out


def scenario_imports(path: Path) -> tuple[set[str], set[str]]:
    """``(modules, names)``: the scenario modules the notebook imports, and the local names bound to them or to
    what they export (``scenario`` in ``from course_lib.scenarios import memory_budget as scenario``...)."""
    modules, names = set(), set()
    for _, _, body in _code_cells(path):
        for node in body:
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("course_lib.scenarios"):
                continue
            if node.module == "course_lib.scenarios":
                modules |= {a.name for a in node.names}
            else:
                modules.add(node.module.rsplit(".", 1)[1])
            names |= {a.asname or a.name for a in node.names}
    return modules, names


def _delegates(fn: ast.FunctionDef, names: set[str]) -> bool:
    """The function calls something the notebook imported from a scenario module."""
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            base = node.func.value if isinstance(node.func, ast.Attribute) else node.func
            if isinstance(base, ast.Name) and base.id in names:
                return True
    return False


def copies(path: Path, scenario: dict[str, list[str]]) -> list[str]:
    modules, imported = scenario_imports(path)
    names = {q.split(".", 1)[1]: q for q in scenario if q.split(".", 1)[0] in modules}
    found = []
    for cell, fn in notebook_functions(path):
        if fn.name in names and not _delegates(fn, imported):
            found.append(f"cell {cell}: {fn.name}() has the name of {names[fn.name]}: call it instead")
            continue
        shape = _shape(fn)
        if len(shape) < MIN_NODES:
            continue
        for qualified, other in scenario.items():
            if len(other) < MIN_NODES:
                continue
            ratio = difflib.SequenceMatcher(None, shape, other, autojunk=False).ratio()
            if ratio >= MAX_SIMILARITY:
                found.append(f"cell {cell}: {fn.name}() is a near copy of {qualified} (similarity {ratio:.2f}): "
                             "call the scenario function instead")
    return found


@pytest.fixture(scope="module")
def scenario():
    return scenario_functions()


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem[:2] for p in SOLUTIONS])
def test_notebook_does_not_rewrite_a_scenario_function(path, scenario):
    assert not copies(path, scenario), "\n".join(copies(path, scenario))


def test_the_check_finds_a_renamed_copy(tmp_path, scenario):
    """A notebook holding a scenario function under another name, with other variable names, is caught."""
    qualified = max(scenario, key=lambda q: len(scenario[q]))
    module, name = qualified.split(".")
    source = textwrap.dedent(inspect.getsource(getattr(importlib.import_module(f"course_lib.scenarios.{module}"),
                                                       name)))
    tree = ast.parse(source)
    tree.body[0].name = "my_own_version"
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in dir(__builtins__):
            node.id = node.id + "_x"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"from course_lib.scenarios import {module}"),
                                         nbformat.v4.new_code_cell(ast.unparse(tree)),
                                         nbformat.v4.new_code_cell(f"def {name}():\n    return 1\n")])
    path = tmp_path / "copy.ipynb"
    nbformat.write(nb, path)
    found = copies(path, scenario)
    assert any("my_own_version() is a near copy of " + qualified in f for f in found), found
    assert any(f"{name}() has the name of" in f for f in found), found
