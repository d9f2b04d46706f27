"""The setup learners and maintainers rely on: pyproject, environment.yml, the Makefile and CI script."""
import ast
import os
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
    """environment.yml is the learner's whole environment: every pyproject package but the test oracles and the
    browser check's playwright."""
    p = _pyproject()["project"]
    extras = p["optional-dependencies"]
    assert set(extras) == {"course", "grading", "oracles", "browser", "all"}, "a new extra: do learners need it?"
    assert "browser" not in extras["all"][0], "playwright is for make browser-check only"
    reqs = p["dependencies"] + extras["course"] + extras["grading"]
    wanted = {CONDA_NAMES.get(_name(d), _name(d)) for d in reqs}
    assert _environment_names() == wanted
    design_card = {"jupyterlab", "pytorch", "matplotlib", "pandas", "nbgrader", "papermill", "nbval"}
    assert design_card | {"ipywidgets"} <= wanted, "tqdm's widgets need ipywidgets where the notebooks run"
    assert "ipywidgets" in {_name(d) for d in extras["course"]}, "make lab installs the course extra"


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


def test_formgrader_prepares_a_complete_gradebook_and_exchange(tmp_path, monkeypatch):
    """`make formgrader`: a half-made gradebook (tables, no alembic_version) is repaired, not tripped on."""
    import sqlite3
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    sys.path.insert(0, str(ROOT / "tests" / "cohort"))
    import formgrader
    from fixtures import build_course

    grading = build_course(tmp_path / "course", release=False)
    db = grading / "gradebook.db"
    with sqlite3.connect(db) as con:  # what a start without alembic on PATH leaves behind
        con.execute("CREATE TABLE assignment (id VARCHAR(128) NOT NULL PRIMARY KEY)")
    assert formgrader.repair_gradebook(db) == "repaired"
    db.unlink()
    done = formgrader.prepare(grading)
    assert done["gradebook"] == "missing" and done["released"] == ["01_alpha", "02_beta"]
    assert (grading / "exchange").is_dir() and done["exchange"] == str(grading / "exchange")
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1
        con.execute("DROP TABLE alembic_version")
    again = formgrader.prepare(grading)
    assert again["gradebook"] == "repaired" and again["released"] == []
    assert formgrader.repair_gradebook(db) == "ok"
    cmd = formgrader.lab_command(grading)
    assert cmd[1] == "lab" and f"--ServerApp.root_dir={grading}" in cmd
    assert ("--allow-root" in cmd) == (os.geteuid() == 0)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "--allow-root" not in formgrader.lab_command(grading)


def test_bench_is_a_package_run_with_python_dash_m():
    """``python -m bench.run_all`` (make bench): every bench imports as ``bench.<name>`` with a ``run()``, and no
    bench edits sys.path to find its siblings or the course."""
    import importlib

    run_all = importlib.import_module("bench.run_all")
    for name in run_all.BENCHES:
        assert callable(getattr(run_all.load_bench(name), "run", None)), name
    for path in (ROOT / "bench").glob("*.py"):
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path"
    makefile = (ROOT / "Makefile").read_text()
    assert "-m bench.run_all" in makefile
