"""The setup learners and maintainers rely on: pyproject, environment.yml, the Makefile and CI script."""
import ast
import re

import tomllib
from nbutil import ROOT

CONDA_NAMES = {"torch": "pytorch"}


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(req: str) -> str:
    return re.split(r"[<>=!\[ ;]", req, maxsplit=1)[0].strip().lower()


def _environment_names() -> set:
    names, in_deps = set(), False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if line.startswith("dependencies:"):
            in_deps = True
            continue
        m = re.match(r"^\s+- ([A-Za-z0-9_.\-]+)", line)
        if in_deps and m and m.group(1) not in ("pip", "-e"):
            names.add(_name(m.group(1)))
    return names - {"python"}


def test_runtime_dependencies_light_and_unpinned():
    deps = _pyproject()["project"]["dependencies"]
    assert {_name(d) for d in deps} == {"torch", "numpy", "pandas", "matplotlib", "scikit-learn", "tqdm"}
    assert not [d for d in deps if "==" in d], "no exact pins: Colab keeps its own versions"


def test_environment_yml_names_the_same_packages_as_pyproject():
    p = _pyproject()["project"]
    wanted = {CONDA_NAMES.get(_name(d), _name(d)) for d in p["dependencies"] + p["optional-dependencies"]["course"]}
    assert _environment_names() == wanted


def test_course_lib_never_imports_tooling():
    banned = {"papermill", "nbval", "nbgrader", "pytest", "peft", "transformers", "bitsandbytes", "dask",
              "nbformat", "IPython"}
    for path in (ROOT / "course_lib").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods = [node.module]
            else:
                continue
            assert not {m.split(".")[0] for m in mods} & banned, f"{path.name} imports {mods}"


def test_ci_runs_make_test_and_makefile_pins_torch_first():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    mk = (ROOT / "Makefile").read_text()
    assert "TORCH_SPEC ?= torch==2.13.0" in mk
    assert mk.index('"$(TORCH_SPEC)"') < mk.index('-e ".[all]"')


def test_readme_shows_the_two_commands_first():
    text = (ROOT / "README.md").read_text()
    first = text.index("make course")
    assert first < 1500 and "make test" in text[:1500]
