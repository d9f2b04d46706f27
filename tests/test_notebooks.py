"""End to end: the course through papermill, the learner notebooks unsolved, release drift."""
from __future__ import annotations

import csv
import filecmp
import json
import re
import shutil
import subprocess
import sys

import nbformat
import pytest
from nbutil import ROOT, errors, execute, kernel_env, nb_ids, notebooks

sys.path.insert(0, str(ROOT))

SOLUTIONS = notebooks("solutions")
RELEASED = notebooks("notebooks")
LAB_ARTIFACTS = ["peft_summary.csv", "pretrain_history.csv", "frozen_head_history.csv",
                 "partial_unfreeze_history.csv", "adapter_history.csv", "peft_curves.png",
                 "source_pretrained_best_state.pt", "adapter_best_state.pt"]
LAB_STRATEGIES = ("frozen_head", "partial_unfreeze", "adapter")

pytestmark = pytest.mark.notebooks


def test_notebooks_numbered_in_sequence_and_released():
    names = [p.stem for p in SOLUTIONS]
    numbers = [int(n[:2]) for n in names]
    assert names and numbers == sorted(set(numbers)) and all(0 <= k <= 10 for k in numbers), names
    assert [p.stem for p in RELEASED] == names, "run `make release`: notebooks/ must mirror solutions/"


COURSE_SUBSET = ("00", "09")
"""What test_make_course runs: the first notebook and the lab (nbval and the unsolved-run test already execute
every notebook, so running all eleven a third time here would only cost CI minutes; `make course` runs them all)."""


def test_make_course_runs_the_solution_notebooks(tmp_path, one_thread):
    """What `make course` runs (on COURSE_SUBSET): fast mode, summary with decisions, lab artifacts."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "run_course.py"), "--runs-dir", str(tmp_path),
                           "--only", *COURSE_SUBSET], env=kernel_env(), capture_output=True, text=True, timeout=1500)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    with open(tmp_path / "latest" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["notebook"] for r in rows] == [p.stem for p in SOLUTIONS if p.stem.startswith(COURSE_SUBSET)]
    failed = {r["notebook"]: (r["cell"], r["error"]) for r in rows if r["status"] != "ok"}
    assert not failed, failed
    assert proc.returncode == 0
    assert all(r["decisions"] for r in rows), "every notebook records its decisions"
    lab = tmp_path / "latest" / "09_peft_lab"  # the lab (10_qlora follows it)
    produced = sorted(p.name for p in lab.iterdir() if p.suffix in (".csv", ".png", ".pt"))
    assert set(LAB_ARTIFACTS) <= set(produced), produced
    check_lab_replays_the_scenario(lab)


def check_lab_replays_the_scenario(lab):
    """The lab's numbers are the scenario's: what test_scenario_transfer.py proves over seeds is what learners run."""
    import pandas as pd

    from course_lib.scenarios import transfer

    summary = pd.read_csv(lab / "peft_summary.csv", index_col="strategy")
    assert {"best_epoch", "final_epoch", "best_before_final", "split_hash", "rule"} <= set(summary.columns)
    assert summary["split_hash"].nunique() == 1 and summary["rule"].nunique() == 1, "one split, one rule"
    ev = transfer.run(0, fast=True, strategies=LAB_STRATEGIES, baselines=False)  # one thread, as the kernel
    for strategy in LAB_STRATEGIES:
        row = summary.loc[strategy]
        assert row["best_value"] == ev[strategy]["best_value"], (strategy, row["best_value"], ev[strategy])
        assert row["best_epoch"] == ev[strategy]["best_epoch"], (strategy, row["best_epoch"], ev[strategy])
        assert abs(row["test_acc"] - ev[strategy]["test_acc"]) < 1e-9, (strategy, row["test_acc"], ev[strategy])


@pytest.mark.parametrize("path", RELEASED, ids=nb_ids(RELEASED))
def test_learner_notebook_runs_with_exercises_unsolved(path, tmp_path):
    """JupyterLab's Run All on an unsolved notebook reaches the last cell, saying what is still missing.

    nbclient with allow_errors=False stops at the first error, as Run All does, and lets a cell tagged
    ``raises-exception`` raise, as JupyterLab does. Every exercise and decision says so in one line.
    """
    work = tmp_path / path.stem
    shutil.copytree(path.parent, work)
    nb = execute(work / path.name, cwd=work, allow_errors=False, parameters={"out_dir": str(work / "artifacts")})
    assert not [i for i, c, _ in errors(nb) if "raises-exception" not in c.metadata.get("tags", [])]
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "every code cell ran"
    text = {id(c): "".join(o.get("text", "") for o in c.outputs) for c in code}
    tests = [c for c in code if c.metadata.get("nbgrader", {}).get("grade")]
    assert tests and all("not written yet" in text[id(c)] or "not answered yet" in text[id(c)] for c in tests), \
        [(c.metadata["nbgrader"]["grade_id"], text[id(c)]) for c in tests]
    for c in tests:
        line = next(ln for ln in text[id(c)].splitlines() if "not written yet" in ln or "not answered yet" in ln)
        assert len(line) <= 160 and ("course_lib's version" in line or "still unanswered" in line), line
    last = text[id(code[-1])]
    assert "Still unanswered" in last and "decisions saved" not in last, last
    assert json.loads((work / "artifacts" / "decisions.json").read_text()).get("first_problem", None) is None


@pytest.mark.parametrize("path", SOLUTIONS, ids=nb_ids(SOLUTIONS))
def test_unsolved_path_cannot_earn_points(path):
    """The guards that let an unsolved notebook run on only wrap visible tests; hidden tests stay outside them.

    Every test cell is ``with exercise(...)`` (code exercises) or ``if answered(...)`` (decisions) around its
    visible part, followed at top level by hidden tests that use the same names, so an unsolved exercise or a
    ``None`` answer fails them (the grader scores a test cell 0 unless every part of it runs cleanly).
    """
    import ast

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type != "code" or not meta.get("grade_id"):
            continue
        if meta.get("solution") and not meta.get("grade"):  # an answer: functions raise, decisions start at None
            begin = next(ln for ln in cell.source.splitlines() if "### BEGIN SOLUTION" in ln)
            head = cell.source.split("### BEGIN SOLUTION")[0]
            assert begin[:1].isspace() or re.search(r"^\w+ = None\b", head, re.M), \
                f"{meta['grade_id']}: a decision cell starts its answers at None"
            continue
        if not meta.get("grade"):
            continue
        visible, sep, hidden = cell.source.partition("### BEGIN HIDDEN TESTS")
        body = [n for n in ast.parse(visible).body if not isinstance(n, (ast.Import, ast.ImportFrom))]
        assert len(body) == 1, f"{meta['grade_id']}: one guard around the visible tests"
        guard = body[0]
        if isinstance(guard, ast.With):
            call = guard.items[0].context_expr
            assert isinstance(call, ast.Call) and call.func.id == "exercise", meta["grade_id"]
            names = [n for n in call.args[0].value.split(" and ")]
        else:
            assert isinstance(guard, ast.If) and guard.test.func.id == "answered", meta["grade_id"]
            names = [k.arg for k in guard.test.keywords]
        hidden = hidden.partition("### END HIDDEN TESTS")[0]
        assert sep and ast.parse(hidden).body, f"{meta['grade_id']}: hidden tests are what scores, and they must exist"
        first = next(ln for ln in hidden.splitlines() if ln.strip())
        assert not first[:1].isspace(), f"{meta['grade_id']}: hidden tests must not continue the guard's block"
        used = {n.id for n in ast.walk(ast.parse(hidden)) if isinstance(n, ast.Name)}
        assert any(n in used for n in names), f"{meta['grade_id']}: hidden tests must use {names}"


def test_released_notebooks_match_solutions(tmp_path):
    """notebooks/ is nbgrader's release of solutions/, never edited by hand."""
    release = tmp_path / "release"
    for path in SOLUTIONS:
        subprocess.run(["nbgrader", "generate_assignment", path.stem, "--force", "--log-level=ERROR",
                        f"--CourseDirectory.release_directory={release}",
                        f"--CourseDirectory.db_url=sqlite:///{tmp_path / 'gb.db'}"],
                       cwd=ROOT / "grading", check=True, capture_output=True,
                       env=dict(kernel_env(), PATH=f"{ROOT / '.venv' / 'bin'}:{kernel_env()['PATH']}"))
    for path in SOLUTIONS:
        fresh = release / path.stem / path.name
        committed = ROOT / "notebooks" / path.stem / path.name
        assert filecmp.cmp(fresh, committed, shallow=False), f"{committed} drifted: run `make release`"


@pytest.mark.parametrize("path", RELEASED, ids=nb_ids(RELEASED))
def test_released_notebooks_have_no_outputs_or_solutions(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        assert not cell.get("outputs"), f"{path.name} ships outputs"
        assert "### BEGIN SOLUTION" not in cell.source and "BEGIN HIDDEN TESTS" not in cell.source


@pytest.mark.parametrize("path", SOLUTIONS, ids=nb_ids(SOLUTIONS))
def test_solution_notebook_structure(path):
    nb = nbformat.read(path, as_version=4)
    tags = [t for c in nb.cells for t in c.metadata.get("tags", [])]
    for tag in ("colab-badge", "course-setup", "parameters"):
        assert tag in tags, f"{path.name}: no cell tagged {tag}"
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    for name in ("fast", "device", "seed", "out_dir"):
        assert f"{name} =" in params.source
    assert "check_version(" in "".join(c.source for c in nb.cells)
    graded = [c.metadata["nbgrader"] for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]
    auto = [m for m in graded if not m.get("solution")]
    manual = [m for m in graded if m.get("solution")]
    assert len(auto) >= 2 and len(manual) >= 1, "exercises + decisions autograded, a manual recipe note"
    ids = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells if "nbgrader" in c.metadata]
    assert len(ids) == len(set(ids)), "duplicate grade ids"
    assert "save_decisions(" in "".join(c.source for c in nb.cells)


def test_shared_cells_in_sync():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "sync_notebooks.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_unsolved_helpers_say_what_is_missing(tmp_path, capsys):
    """course_lib.notebook's unsolved path: one line each, errors other than the stub's still raise."""
    from course_lib import notebook

    def stub(x):
        raise NotImplementedError()

    with notebook.exercise("stub"):
        stub(1)
    assert "stub is not written yet" in capsys.readouterr().out
    with pytest.raises(AssertionError), notebook.exercise("wrong"):
        raise AssertionError("a wrong answer is shown")
    assert notebook.answered(a=1, b="x") and capsys.readouterr().out == ""
    assert not notebook.answered(a=None, b=0) and "[decision] a not answered yet" in capsys.readouterr().out
    with pytest.raises(TypeError, match="needs the decision names"):
        notebook.answered()
    fn = notebook.use_or_fallback(stub, abs, -2, name="my_stub")
    assert fn is abs and "my_stub" in notebook.unsolved_exercises()
    notebook.save_decisions(tmp_path, a=None, b=2)
    out = capsys.readouterr().out
    assert "Still unanswered" in out and "my_stub" in out and "a" in out.split("decisions (still None):")[1]
    assert json.loads((tmp_path / "decisions.json").read_text()) == {"b": 2}
    assert notebook.use_or_fallback(abs, abs, -2, name="my_stub") is abs
    assert "my_stub" not in notebook.unsolved_exercises()
    notebook.save_decisions(tmp_path, a=1, b=2)
    assert capsys.readouterr().out.splitlines()[-1] == "decisions saved to decisions.json in out_dir"


def test_blank_learner_notebook_scores_zero(tmp_path):
    """The unsolved path earns nothing: notebook 00 as released, graded by grading_cli, scores 0 on every test
    cell, each for failed hidden tests (the visible part runs cleanly under its guard)."""
    from grading_cli.course import Course, assignment_spec
    from grading_cli.task import grade_one

    name = SOLUTIONS[0].stem
    (tmp_path / "grading").mkdir()
    shutil.copy(ROOT / "grading" / "nbgrader_config.py", tmp_path / "grading")
    shutil.copytree(ROOT / "solutions" / name, tmp_path / "solutions" / name,
                    ignore=shutil.ignore_patterns("artifacts", "*.pt", "*.png", ".ipynb_checkpoints"))
    course = Course.load(tmp_path / "grading")
    course.release_all([name])
    spec = assignment_spec(course, name)
    blank = (course.release / name / f"{name}.ipynb").read_bytes()
    options = {"limits": {"cell_timeout": 600, "notebook_timeout": 1200}, "isolation": "auto",
               "params": {"fast": True, "device": "cpu", "out_dir": "artifacts"}}
    result = grade_one(spec, {"student": "blank", "assignment": name, "files": {f"{name}.ipynb": blank}}, options)
    cells = [c for c in result["notebooks"][0]["cells"] if c["kind"] == "test"]
    assert cells and all(c["score"] == 0 for c in cells), cells
    assert all(c["reason"].startswith("hidden tests failed") for c in cells), cells
