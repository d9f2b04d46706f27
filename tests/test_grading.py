"""The autograder (grading_cli): a cohort of every case a class produces, graded in parallel, in a sandbox.

One module-scoped run grades the fixture cohort (two small assignments, every case of issue 4) with two
Dask workers; the other tests read its results, regrade subsets with 1 worker and with a separate
`dask scheduler` + `dask worker` on loopback, and check repair, collection, scoring and the sandbox alone.
"""
from __future__ import annotations

import csv
import fcntl
import html
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "cohort"))
from fixtures import build_course  # noqa: E402
from make_cohort import make_cohort  # noqa: E402

from grading_cli import driver  # noqa: E402
from grading_cli.collect import collect  # noqa: E402
from grading_cli.course import Course, assignment_spec  # noqa: E402
from grading_cli.execute import Limits, execute_notebook, probe_isolation  # noqa: E402
from grading_cli.repair import repair  # noqa: E402
from grading_cli.score import build_exec, merge, score_cells, split_hidden  # noqa: E402
from grading_cli.task import grade_one  # noqa: E402

pytestmark = pytest.mark.xdist_group("grading")  # with --dist loadgroup the cohort is graded once

# Autograded points each case must get (01_alpha: 6 auto + 2 by hand; 02_beta: 6 auto + 1 by hand).
EXPECTED = {
    "correct": (6, 6), "blank": (0, 0), "wrong_decision": (4, 4), "partial": (4, 3), "syntax_error": (4, 3),
    "infinite_loop": (4, 4), "edited_tests": (4, 3), "deleted_tests": (6, 3), "edited_locked": (None, 6),
    "duplicated": (6, 6), "metadata_stripped": (6, 6), "reordered": (6, 6), "renamed": (6, 6),
    "huge_output": (6, 6), "crash": (2, 3), "stderr_noise": (6, 6), "gaming": (4, 4), "corrupt": (0, 0),
    "missing_student": (0, 0),
}
PARTIAL = {  # right on the visible test, wrong on the hidden ones
    "01_alpha": {"ex1_warmup": "def warmup_factor(step, warmup_steps):\n    return step / warmup_steps if warmup_steps"
                               " else 1.0"},
    "02_beta": {"ex1_lora": "def lora_params(d_in, d_out, r):\n    return r * (d_in + d_out) if d_in == d_out else r"
                            " * d_in"},
}
LIMITS = {"cell_timeout": 10, "notebook_timeout": 120, "interrupt_grace": 3}
OPTIONS = {"limits": LIMITS, "isolation": "auto", "params": {"fast": True, "device": "cpu", "out_dir": "artifacts"}}
SUBSET = [("stderr_noise", "01_alpha"), ("crash", "02_beta"), ("renamed", "02_beta")]
REAL = ("01_optimizers_regularization", "00_recipe_demo")  # the cheapest course notebooks in fast mode
TAMPER = {"edited_tests", "edited_locked", "deleted_cells", "changed_points", "changed_metadata", "suspicious_code"}


def read_csv(path) -> dict:
    with open(path) as f:
        return {(r["student"], r["assignment"]): r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """The cohort graded once per test run, shared by pytest-xdist workers (read-only: copy it to change it)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    base = shared / "grading-cohort"
    with open(shared / "grading-cohort.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / "done.json").exists():
            shutil.rmtree(base, ignore_errors=True)
            course = Course.load(build_course(base / "course"))
            expected = make_cohort(base / "cohort", course.root, partial=PARTIAL)
            roster = driver.read_roster(base / "cohort" / "roster.csv")
            summary = driver.grade(course, base / "cohort", roster=roster, workers=2, options=OPTIONS)
            done = {"expected": expected, "roster": roster, "summary": summary}
            (base / "done.json").write_text(json.dumps(done))
    done = json.loads((base / "done.json").read_text())
    course = Course.load(base / "course" / "grading")
    return dict(done, course=course, base=base, rows=read_csv(course.root / "grades.csv"))


def private(graded, tmp_path) -> Course:
    """A copy of the graded course (gradebook, results) that a test may change."""
    shutil.copytree(graded["base"] / "course", tmp_path / "course")
    return Course.load(tmp_path / "course" / "grading")


def test_cohort_expectations_are_the_written_down_ones(graded):
    computed = {(e["student"], e["assignment"]): float(e["score"]) for e in graded["expected"]}
    table = {(s, a): v for s, pair in EXPECTED.items() for a, v in zip(("01_alpha", "02_beta"), pair)
             if v is not None}
    assert computed == table


def test_cohort_scores_flags_and_repairs(graded):
    rows = graded["rows"]
    bad = []
    for e in graded["expected"]:
        row = rows[(e["student"], e["assignment"])]
        flags, repairs = set(row["flags"].split(";")), set(row["repairs"].split(";"))
        if float(row["score"]) != float(e["score"]) or not set(filter(None, e["flags"].split(";"))) <= flags \
                or not set(filter(None, e["repairs"].split(";"))) <= repairs:
            bad.append((e, row["score"], row["flags"], row["repairs"], row["cells"]))
    assert not bad, bad
    for student in ("correct", "blank", "wrong_decision", "stderr_noise", "renamed", "metadata_stripped"):
        for a in ("01_alpha", "02_beta"):
            assert not set(rows[(student, a)]["flags"].split(";")) & TAMPER, (student, a, rows[(student, a)])
    assert rows[("correct", "01_alpha")]["max_score"] == "8" and rows[("correct", "02_beta")]["max_score"] == "7"
    assert "needs_manual_grade" in rows[("correct", "01_alpha")]["flags"]
    assert graded["summary"]["workers"] == 2 and graded["summary"]["isolation"] == [probe_isolation("auto")]


def test_every_roster_student_appears_once_per_assignment(graded):
    keys = sorted(graded["rows"])
    assert keys == sorted((s, a) for s in graded["roster"] for a in ("01_alpha", "02_beta"))
    assert graded["rows"][("missing_student", "02_beta")]["status"] == "missing"
    assert graded["rows"][("corrupt", "01_alpha")]["status"] == "unreadable"


def test_gradebook_holds_the_scores_and_flags(graded):
    course = graded["course"]
    with course.gradebook() as gb:
        sub = gb.find_submission("01_alpha", "partial")
        assert sub.score == 4.0 and sub.max_score == 8.0
        grade = gb.find_grade("recipe_note", "01_alpha", "01_alpha", "partial")
        assert grade.needs_manual_grade and grade.auto_score is None
        assert gb.find_submission_notebook("01_alpha", "01_alpha", "edited_tests").flagged
        assert not gb.find_submission_notebook("01_alpha", "01_alpha", "correct").flagged
    autograded = nbformat.read(course.root / "autograded" / "correct" / "01_alpha" / "01_alpha.ipynb", as_version=4)
    assert any("### BEGIN HIDDEN TESTS" in c.source for c in autograded.cells), "instructors see the hidden tests"


def test_feedback_never_shows_hidden_tests(graded):
    course = graded["course"]
    secret = set()
    for a in ("01_alpha", "02_beta"):
        for cell in assignment_spec(course, a)["notebooks"][0]["cells"]:
            for hidden, code in split_hidden(cell["full"]):
                secret |= {ln.strip() for ln in code.split("\n") if hidden and len(ln.strip()) > 10}
    assert len(secret) >= 6
    pages = sorted((course.root / "feedback").glob("*/*/*.html"))
    graded_rows = [k for k, r in graded["rows"].items() if r["status"] == "graded"]
    assert len(pages) == len(graded_rows)
    for page in pages:
        text = html.unescape(page.read_text())
        assert "BEGIN HIDDEN" not in text, page
        assert not [s for s in secret if s in text], page
    gaming = html.unescape((course.root / "feedback" / "gaming" / "01_alpha" / "01_alpha.html").read_text())
    assert "output hidden" in gaming and "Hidden tests: failed" in gaming


def test_regrade_is_idempotent_with_one_worker_and_a_zip(graded, tmp_path):
    course = private(graded, tmp_path)
    before = (course.root / "grades.csv").read_text()
    archive = tmp_path / "subset.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for student, a in SUBSET:
            for f in (graded["base"] / "cohort" / student / a).iterdir():
                zf.write(f, f"class/{student}/{a}/{f.name}")
    summary = driver.grade(course, archive, roster=graded["roster"], workers=1, options=OPTIONS)
    assert summary["workers"] == 1 and summary["submissions"] == len(SUBSET)
    assert (course.root / "grades.csv").read_text() == before


def test_same_results_on_a_separate_scheduler_and_workers(graded, tmp_path):
    course = private(graded, tmp_path)
    before = (course.root / "grades.csv").read_text()
    flat = tmp_path / "flat"
    flat.mkdir()
    for student, a in SUBSET:  # an LMS download: <student>_<notebook>.ipynb
        for f in (graded["base"] / "cohort" / student / a).iterdir():
            shutil.copy(f, flat / f"{student}_{f.name}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen([str(bin_dir / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nworkers", "2",
                                       "--nthreads", "1", "--no-dashboard", "--memory-limit", "0"], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(f"tcp://127.0.0.1:{port}", timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        summary = driver.grade(course, flat, roster=graded["roster"], scheduler=f"tcp://127.0.0.1:{port}",
                               options=OPTIONS)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=30)
    assert summary["workers"] == 2
    assert (course.root / "grades.csv").read_text() == before


def test_manual_grades_survive_a_regrade(graded, tmp_path):
    course = private(graded, tmp_path)
    result = json.loads((course.root / "autograded" / "wrong_decision" / "02_beta" / "grading_result.json").read_text())
    files = {p.name: p.read_bytes() for p in (course.root / "submitted" / "wrong_decision" / "02_beta").iterdir()}
    with course.gradebook() as gb:
        grade = gb.find_grade("recipe_note", "02_beta", "02_beta", "wrong_decision")
        grade.manual_score = 1.0
        gb.db.commit()
    driver.store(course, result, files)
    row = read_csv(driver.export(course, graded["roster"]))[("wrong_decision", "02_beta")]
    assert row["score"] == "5" and "needs_manual_grade" not in row["flags"] and "recipe_note=1/1" in row["cells"]


def test_a_second_grading_run_on_the_same_course_is_refused(graded, tmp_path):
    course = private(graded, tmp_path)
    with open(course.root / ".grading.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another grading run"):
            driver.grade(course, graded["base"] / "cohort", options=OPTIONS)


# ---- pieces, without the cohort -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def specs(graded):
    return {a: assignment_spec(graded["course"], a) for a in ("01_alpha", "02_beta")}


def test_task_needs_no_course_files_and_sees_none(specs, graded, tmp_path):
    """A worker gets everything as arguments; inside the sandbox the course, solutions and network are gone."""
    spec = specs["01_alpha"]
    probe = ("import os, socket\nprint('SEES', sorted(os.listdir('.')), os.getuid(), "
             f"os.path.exists({str(graded['course'].root)!r}), os.path.exists({str(graded['base'])!r}))\n"
             "try:\n    socket.create_connection(('192.0.2.1', 80), timeout=2)\n    print('NET open')\n"
             "except OSError as err:\n    print('NET', err.errno)")
    nb = nbformat.reads(spec["notebooks"][0]["released"], as_version=4)
    nb.cells.insert(5, new_code_cell(probe))
    sub = {"student": "probe", "assignment": "01_alpha", "files": {"01_alpha.ipynb": nbformat.writes(nb).encode(),
                                                                    "helper.py": b"X = 1\n"}}
    result = grade_one(spec, sub, OPTIONS)
    out = "".join(o.get("text", "") for c in nbformat.reads(result["notebooks"][0]["autograded"], as_version=4).cells
                  for o in c.get("outputs", []) if "SEES" in o.get("text", "") or "NET" in o.get("text", ""))
    assert "'01_alpha.ipynb'" in out and "'helper.py'" in out
    if probe_isolation("auto") == "full":
        assert "SEES ['01_alpha.ipynb', 'helper.py'] 65534 False False" in out, out
        assert "NET 101" in out, out
    else:
        pytest.skip(f"full isolation is not available here ({probe_isolation('auto')})")


def test_degraded_isolation_is_flagged(specs):
    sub = {"student": "x", "assignment": "02_beta", "files": {"02_beta.ipynb": b"{not json"}}
    result = grade_one(specs["02_beta"], sub, dict(OPTIONS, isolation="none"))
    codes = {f["code"] for f in result["notebooks"][0]["flags"]}
    assert result["status"] == "unreadable" and {"unreadable", "isolation_degraded"} <= codes
    assert [c["score"] for c in result["notebooks"][0]["cells"] if c["kind"] == "test"] == [0.0, 0.0, 0.0]


def test_limits_memory_cpu_and_whole_notebook():
    cells = ["x = bytearray(1500 * 2**20)", "print('alive')", "while True:\n    pass", "print('never')"]
    nb = new_notebook(cells=[new_code_cell(c) for c in cells])
    run = execute_notebook(nb, {}, level=probe_isolation("auto"),
                           limits=Limits(cell_timeout=120, notebook_timeout=200, memory_mb=1024, cpu_seconds=5))
    assert nb.cells[0].outputs[-1].ename == "MemoryError" and run["statuses"][:2] == ["error", "ok"]
    assert run["statuses"][2:] == ["died", "not_run"] and ("kernel_died", 2) in run["events"]
    nb = new_notebook(cells=[new_code_cell("import time\ntime.sleep(2)") for _ in range(5)])
    t0 = time.monotonic()
    run = execute_notebook(nb, {}, level=probe_isolation("auto"), limits=Limits(cell_timeout=60, notebook_timeout=5))
    assert time.monotonic() - t0 < 40, "the whole-notebook limit stops a notebook of short cells"
    assert run["statuses"][0] == "ok" and run["statuses"][-1] == "not_run"
    assert [kind for kind, _ in run["events"]] == ["notebook_timeout"]


def _learner(spec, edit):
    nb = nbformat.reads(spec["notebooks"][0]["released"], as_version=4)
    edit(nb)
    return nb


def test_repair_restores_order_tests_and_metadata(specs):
    spec = specs["01_alpha"]
    rels = spec["notebooks"][0]["cells"]
    answer = next(i for i, r in enumerate(rels) if r["grade_id"] == "ex2_best")

    def edit(nb):
        nb.cells[answer].source = "def best_epoch(v):\n    return v.index(min(v))"
        helper = new_code_cell("def my_helper():\n    return 1")
        for cell in nb.cells:
            cell.metadata = {}
        nb.cells.insert(answer, helper)
        nb.cells.insert(answer + 1, new_code_cell(rels[answer]["source"]))  # a copy of the stub after the answer
        moved = nb.cells.pop(answer + 3)  # the answer's test, moved to the end and edited
        moved.source = "pass"
        nb.cells.append(moved)

    cells, repairs, flags = repair(rels, _learner(spec, edit), "01_alpha")
    sources = [c.source for c in cells]
    got = sources.index("def best_epoch(v):\n    return v.index(min(v))")
    assert sources[got - 1].startswith("def my_helper"), "a learner's own cell stays before the answer"
    assert "### BEGIN HIDDEN TESTS" in sources[got + 1] and "best_epoch([3.0, 2.0, 2.5])" in sources[got + 1]
    assert len(cells) == len(rels) + 2 and sources[-1] == "pass" and sources.count(rels[answer]["source"]) == 0
    assert {r["code"] for r in repairs} >= {"metadata_restored", "duplicate_cells"}
    assert {f["code"] for f in flags} == {"deleted_cells"}
    assert [c.metadata["nbgrader"]["grade_id"] for c in cells if "nbgrader" in c.metadata] == \
        [r["grade_id"] for r in rels if r["grade_id"]]


def test_repair_flags_points_metadata_and_deleted_cells(specs):
    rels = specs["02_beta"]["notebooks"][0]["cells"]
    test = next(i for i, r in enumerate(rels) if r["grade_id"] == "ex1_lora_tests")
    locked = next(i for i, r in enumerate(rels) if r["kind"] == "locked")

    def edit(nb):
        nb.cells[test].metadata.nbgrader.points = 30
        nb.cells[test].metadata.nbgrader.grade = False
        del nb.cells[locked]

    cells, _, flags = repair(rels, _learner(specs["02_beta"], edit), "02_beta")
    codes = {f["code"] for f in flags}
    assert codes == {"changed_points", "changed_metadata", "deleted_cells"}
    assert cells[locked].source == rels[locked]["full"] and cells[test].metadata.nbgrader.points == 3


def test_scoring_ignores_stderr_and_trailing_numbers(specs):
    rels = specs["01_alpha"]["notebooks"][0]["cells"]
    by_id = {r["grade_id"]: r for r in rels if r["grade_id"]}
    cells, _, _ = repair(rels, nbformat.reads(specs["01_alpha"]["notebooks"][0]["released"], as_version=4), "x")
    exec_nb, where = build_exec(cells, by_id, {"fast": True})
    statuses = []
    for cell in exec_nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="100%|####| warning\n"),
                            nbformat.v4.new_output("execute_result", data={"text/plain": "0.0"}, execution_count=1)]
        statuses.append("ok" if cell.cell_type == "code" else None)
    info = merge(cells, exec_nb, where, statuses)
    scores = score_cells(cells, info, by_id)
    assert [s["score"] for s in scores if s["kind"] == "test"] == [2.0, 2.0, 2.0]
    assert any("fast = True" in c.source for c in exec_nb.cells), "the grader injects fast mode"


def test_split_hidden_keeps_order_and_falls_back():
    parts = split_hidden("a = 1\n### BEGIN HIDDEN TESTS\nassert a == 1\n### END HIDDEN TESTS\nb = 2")
    assert parts == [(False, "a = 1"), (True, "assert a == 1"), (False, "b = 2")]
    nested = "for i in range(2):\n### BEGIN HIDDEN TESTS\n    assert i < 2\n### END HIDDEN TESTS"
    assert split_hidden(nested) == [(True, nested)]


def test_collect_layouts_agree(graded, tmp_path):
    specs = {a: assignment_spec(graded["course"], a) for a in ("01_alpha", "02_beta")}
    nested, _ = collect(graded["base"] / "cohort", specs)
    flat = tmp_path / "flat"
    flat.mkdir()
    for s in nested:
        for name, data in s.files.items():
            (flat / f"{s.student}_{name}").write_bytes(data)
    archive = tmp_path / "class.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for s in nested:
            for name, data in s.files.items():
                zf.writestr(f"download/{s.student}/{s.assignment}/{name}", data)
        zf.writestr("../evil.ipynb", b"{}")
    flat_subs, _ = collect(flat, specs)
    zip_subs, _ = collect(archive, specs)

    def key(subs):
        return {(s.student, s.assignment, tuple(sorted(s.files.values()))) for s in subs}

    assert key(nested) == key(zip_subs) == key(flat_subs)
    assert len(nested) == sum(1 for e in graded["expected"] if e["student"] != "missing_student")


def test_bad_inputs_are_refused(graded, tmp_path):
    with pytest.raises(ValueError, match="isolation must be"):
        probe_isolation("sandboxed")
    with pytest.raises(ValueError, match="submissions must be a folder or a .zip"):
        collect(tmp_path / "nope", {})
    with pytest.raises(ValueError, match="course_root must hold nbgrader_config.py"):
        Course.load(tmp_path)
    with pytest.raises(ValueError, match="not released"):
        assignment_spec(graded["course"], "99_nothing")


def test_make_grade_target_calls_the_cli():
    proc = subprocess.run(["make", "-n", "grade", "SUBMISSIONS=some/dir"], cwd=ROOT, capture_output=True, text=True)
    assert "-m grading_cli grade" in proc.stdout and "some/dir" in proc.stdout, proc.stdout + proc.stderr


def test_course_test_cells_are_scoreable():
    """The real course's test cells: no bare trailing expression (nbgrader's partial credit), markers paired."""
    from grading_cli.__main__ import check_test_cells

    course = Course.load(ROOT / "grading")
    if not course.source_assignments():
        pytest.skip("no course notebooks yet")
    assert check_test_cells(course) == []


def test_check_test_cells_finds_a_bare_number(tmp_path):
    from grading_cli.__main__ import check_test_cells

    (tmp_path / "grading").mkdir()
    shutil.copy(ROOT / "grading" / "nbgrader_config.py", tmp_path / "grading")
    hidden = '### BEGIN HIDDEN TESTS\nassert answer == "adaptation"\n### END HIDDEN TESTS'
    nb = new_notebook(cells=[new_markdown_cell("x"), new_code_cell("assert True\n0.5"), new_code_cell(hidden)])
    for i, gid in ((1, "t1"), (2, "t2")):
        nb.cells[i].metadata["nbgrader"] = {"grade": True, "solution": False, "locked": True, "grade_id": gid,
                                            "points": 1, "schema_version": 3}
    (tmp_path / "solutions" / "01_x").mkdir(parents=True)
    nbformat.write(nb, tmp_path / "solutions" / "01_x" / "01_x.ipynb")
    problems = check_test_cells(Course.load(tmp_path / "grading"))
    assert len(problems) == 2 and "t1: ends in a bare expression" in problems[0]
    assert "t2: compares answer with ==" in problems[1]


def test_real_course_assignments_grade_as_expected(tmp_path):
    """Two real notebooks, saved from Colab (metadata stripped, renamed) with one wrong decision, in the sandbox."""
    available = [p.parent.name for p in sorted((ROOT / "solutions").glob("[0-9]*/*.ipynb"))
                 if p.parent.name == p.stem]
    picks = ([a for a in REAL if a in available] + [a for a in available if a not in REAL])[:2]
    if len(picks) < 2:
        pytest.skip("fewer than two course notebooks so far")
    root = tmp_path / "course"
    (root / "grading").mkdir(parents=True)
    shutil.copy(ROOT / "grading" / "nbgrader_config.py", root / "grading")
    for a in picks:
        shutil.copytree(ROOT / "solutions" / a, root / "solutions" / a,
                        ignore=shutil.ignore_patterns("artifacts", "*.pt", "*.png", ".ipynb_checkpoints"))
    course = Course.load(root / "grading")
    course.release_all(picks)
    expected = []
    for a in picks:
        rows = make_cohort(tmp_path / "cohort", course.root, [a], ["colab"])
        rows = rows if len(rows) > 1 else make_cohort(tmp_path / "cohort", course.root, [a], ["metadata_stripped"])
        expected += [r for r in rows if r["student"] != "missing_student"]
    options = dict(OPTIONS, limits={"cell_timeout": 600, "notebook_timeout": 1200})
    driver.grade(course, tmp_path / "cohort", workers=2, options=options)
    got = read_csv(course.root / "grades.csv")
    for e in expected:
        row = got[(e["student"], e["assignment"])]
        assert float(row["score"]) == float(e["score"]), (e, row)
        assert set(e["repairs"].split(";")) <= set(row["repairs"].split(";")), (e, row)
        assert not set(row["flags"].split(";")) & TAMPER, row
