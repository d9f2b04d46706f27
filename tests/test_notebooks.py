"""End to end: the course through papermill, the learner notebooks unsolved, release drift."""
from __future__ import annotations

import csv
import filecmp
import shutil
import subprocess
import sys

import nbformat
import pytest
from nbutil import ROOT, errors, execute, kernel_env, nb_ids, notebooks

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
    assert names and numbers == sorted(set(numbers)) and all(0 <= k <= 9 for k in numbers), names
    assert [p.stem for p in RELEASED] == names, "run `make release`: notebooks/ must mirror solutions/"


def test_make_course_runs_every_solution_notebook(tmp_path, one_thread):
    """What `make course` runs: all solution notebooks, fast mode, summary with decisions, lab artifacts."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "run_course.py"), "--runs-dir", str(tmp_path)],
                          env=kernel_env(), capture_output=True, text=True, timeout=1500)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    with open(tmp_path / "latest" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["notebook"] for r in rows] == [p.stem for p in SOLUTIONS]
    failed = {r["notebook"]: (r["cell"], r["error"]) for r in rows if r["status"] != "ok"}
    assert not failed, failed
    assert proc.returncode == 0
    assert all(r["decisions"] for r in rows), "every notebook records its decisions"
    lab = tmp_path / "latest" / SOLUTIONS[-1].stem
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
    """Only exercise stubs (NotImplementedError) and the tests that check them may fail; everything else runs."""
    work = tmp_path / path.stem
    shutil.copytree(path.parent, work)
    nb = execute(work / path.name, cwd=work, allow_errors=True, parameters={"out_dir": str(work / "artifacts")})
    bad = []
    for i, cell, err in errors(nb):
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade") and not meta.get("solution"):
            continue  # a test cell of an unsolved exercise
        if meta.get("solution") and err["ename"] == "NotImplementedError":
            continue  # the stub itself
        bad.append((i, err["ename"], err["evalue"][:200], cell.source[:120]))
    assert not bad, bad
    stubs = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution") and c.cell_type == "code"]
    assert stubs and all("raise NotImplementedError()" in c.source for c in stubs)


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
