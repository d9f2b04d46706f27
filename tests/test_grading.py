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
sys.path.insert(0, str(ROOT / "tests" / "cohort"))  # the cohort builders are scripts, not a package
from fixtures import build_course  # noqa: E402
from make_cohort import make_cohort  # noqa: E402

from grading_cli import driver  # noqa: E402
from grading_cli.collect import collect  # noqa: E402
from grading_cli.course import Course, assignment_spec  # noqa: E402
from grading_cli.execute import Limits, execute_notebook, probe_isolation  # noqa: E402
from grading_cli.flags import TAMPER  # noqa: E402
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
    # hostile (issue 14): no undeserved point (the grader checks outside the kernel), and tampering is flagged
    "shadow_builtins": (4, 4), "kernel_alias": (0, 0), "patch_reference": (None, 5), "shadow_package": (6, 6),
    "read_hidden": (6, 6), "hostile_output": (4, 3), "daemon": (6, 6), "read_frames": (6, 6),
    "forge_answers": (4, 4),
}
TAMPERING = {"shadow_builtins", "patch_reference", "read_frames"}  # must be flagged for a human
PARTIAL = {  # right on the visible test, wrong on the hidden ones
    "01_alpha": {"ex1_warmup": "def warmup_factor(step, warmup_steps):\n    return step / warmup_steps if warmup_steps"
                               " else 1.0"},
    "02_beta": {"ex1_lora": "def lora_params(d_in, d_out, r):\n    return r * (d_in + d_out) if d_in == d_out else r"
                            " * d_in"},
}
LIMITS = {"cell_timeout": 10, "notebook_timeout": 120, "interrupt_grace": 3}
OPTIONS = {"limits": LIMITS, "isolation": "auto", "unsafe": True,  # CI is not root: whatever level it has
           "params": {"fast": True, "device": "cpu", "out_dir": "artifacts"}}
SUBSET = [("stderr_noise", "01_alpha"), ("crash", "02_beta"), ("renamed", "02_beta")]
REAL = ("01_optimizers_regularization", "00_recipe_demo")  # the cheapest course notebooks in fast mode


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
    assert "Hidden tests: failed" in gaming
    # hidden tests run with store_history=False: printing In / _ih shows none of them, even to instructors
    printed = _outputs(course, "gaming", "01_alpha")
    assert "print(In[-5:])" in printed and not [x for x in secret if x in printed]


def _outputs(course, student, assignment) -> str:
    """Everything the kernel printed or displayed for one submission (the autograded notebook's outputs)."""
    nb = nbformat.read(course.root / "autograded" / student / assignment / f"{assignment}.ipynb", as_version=4)
    return "\n".join(json.dumps(o) for c in nb.cells for o in c.get("outputs", []))


def _secret_lines(course) -> set[str]:
    out = set()
    for a in ("01_alpha", "02_beta"):
        for cell in assignment_spec(course, a)["notebooks"][0]["cells"]:
            for hidden, code in split_hidden(cell["full"]):
                out |= {ln.strip() for ln in code.split("\n") if hidden and len(ln.strip()) > 10}
    return out


def test_hostile_cohort_gets_no_unflagged_point_and_leaks_nothing(graded):
    rows, course = graded["rows"], graded["course"]
    for student in TAMPERING | {"kernel_alias", "shadow_package"}:
        for a in ("01_alpha", "02_beta"):
            if (student, a) in rows and rows[(student, a)]["status"] == "graded":
                assert "suspicious_code" in rows[(student, a)]["flags"], (student, a, rows[(student, a)])
                with course.gradebook() as gb:
                    assert gb.find_submission_notebook(a, a, student).flagged, (student, a)
    for a in ("01_alpha", "02_beta"):
        # silenced errors: the execution reply still says error, so a blank notebook stays at 0
        assert rows[("kernel_alias", a)]["score"] == "0" and "reply_error" in rows[("kernel_alias", a)]["flags"]
        # a course_lib/ shipped beside the notebook is left out: the real one is imported
        shadow = _outputs(course, "shadow_package", a)
        assert "SHADOWED" not in shadow and "course_lib/__init__.py" in shadow
        # the notebook in the kernel's folder holds no hidden test, however it is encoded
        import base64
        import re as _re

        blobs = _re.findall(r"\.ipynb ([A-Za-z0-9+/=]{200,})", _outputs(course, "read_hidden", a))
        assert blobs, "the case printed the notebook files it could read"
        decoded = "".join(base64.b64decode(b).decode() for b in blobs)
        assert "BEGIN HIDDEN" not in decoded and not [x for x in _secret_lines(course) if x in decoded]
        # nor in the kernel's process: history, linecache, every thread's frames, the gc's dicts (every test
        # cell of the fixtures is checked by the grader, so no hidden line is ever sent to the kernel)
        frames = _re.findall(r"FRAMES ([A-Za-z0-9+/=]+)", _outputs(course, "read_frames", a))
        assert frames, "the case printed what it found"
        found = base64.b64decode(frames[0]).decode()
        assert "assert" in found, "it did see the visible tests"
        assert not [x for x in _secret_lines(course) if x in found], found
        # forged evidence (decisions.json, a line in the grader's answer format) changes nothing
        assert rows[("forge_answers", a)]["score"] == str(EXPECTED["forge_answers"][a == "02_beta"])
    # no process outlives its submission (a detached daemon died with the sandbox's PID namespace)
    survivors = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"grading-daemon-" in (proc / "cmdline").read_bytes():
                survivors.append(proc.name)
        except OSError:
            continue
    if probe_isolation("auto") != "none":
        assert not survivors, survivors


class _Page(__import__("html.parser").parser.HTMLParser):
    """What a browser would run: script elements, event-handler attributes, script URLs, the CSP."""

    def __init__(self):
        super().__init__()
        self.scripts, self.handlers, self.urls, self.csp, self._in_script, self.first_in_head = [], [], [], [], 0, None
        self._head = False

    def handle_starttag(self, tag, attrs):
        if self._head and self.first_in_head is None:
            self.first_in_head = (tag, dict(attrs))
        self._head = self._head or tag == "head"
        for k, v in attrs:
            if k.startswith("on"):
                self.handlers.append((tag, k, v))
            if k in ("href", "src", "action", "formaction") and v and "script:" in v.replace(" ", "").lower():
                self.urls.append((tag, v))
        if tag == "meta" and dict(attrs).get("http-equiv", "").lower() == "content-security-policy":
            self.csp.append(dict(attrs)["content"])
        if tag == "script":
            self.scripts.append("")
            self._in_script += 1

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script -= 1

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def test_feedback_runs_no_learner_script(graded):
    course = graded["course"]
    for a in ("01_alpha", "02_beta"):
        page_text = (course.root / "feedback" / "hostile_output" / a / f"{a}.html").read_text()
        page = _Page()
        page.feed(page_text)
        assert page.first_in_head and page.first_in_head[0] == "meta" and page.csp, page.first_in_head
        assert "script-src 'none'" in page.csp[0] and "default-src 'none'" in page.csp[0]
        assert not page.handlers and not page.urls, (page.handlers, page.urls)
        assert not [sc for sc in page.scripts if "PWNED" in sc or "alert" in sc], "a learner script is in the page"
        assert len(page_text) < 3_000_000, "the 3 MB display update was capped"
        stored = nbformat.read(course.root / "autograded" / "hostile_output" / a / f"{a}.ipynb", as_version=4)
        kinds = {k for c in stored.cells for o in c.get("outputs", []) for k in o.get("data", {})}
        assert kinds <= {"text/plain", "text/html", "image/png"}, kinds  # formgrader renders this notebook
        markup = json.dumps([o["data"]["text/html"] for c in stored.cells for o in c.get("outputs", [])
                             if "text/html" in o.get("data", {})])
        assert "PWNED" in markup and "<script" not in markup and "onerror" not in markup, markup[:500]


def test_report_escapes_learner_text(graded):
    report = (graded["course"].root / "report.md").read_text()
    lines = report.splitlines()
    assert "boom" in report, "the exception message is reported"
    assert not [ln for ln in lines if "Corrected grades" in ln and ln.lstrip().startswith("#")]
    assert not [ln for ln in lines if ln.startswith("| hostile_output | 100")]
    assert "<script>" not in report
    assert sum(ln.startswith("## ") for ln in lines) == report.count("\n## ")


ATTACKS = {  # one per class of issue 14 item 3; a regex over the source missed each of them
    "builtin": "abs = lambda x: 0",
    "answer_key": "from course_lib.scenarios import diagnosis as d\ndiagnosis = d.planted(seed)",
    "answer_key_name": "from course_lib.scenarios.diagnosis import identify as guess\ndiagnosis = guess(evidence)",
    "builtin_def": "def type(x):\n    return str",
    "kernel_alias": "g = get_ipython\nip = g()\nip.ast_transformers.append(object())",
    "kernel_import": "from IPython import get_ipython as gi\ngi().showtraceback = lambda *a, **k: None",
    "module_setattr": "import course_lib.train as t\nsetattr(t, 'fit', lambda *a: None)",
    "module_attr": "from course_lib import train\ntrain.fit = print",
    "module_attr_numpy": "import numpy as np\nnp.allclose = lambda *a, **k: True",
    "globals": "globals()['abs'] = max",
    "globals_alias": "g = globals\ng().update(x=1)",
    "vars": "import course_lib.train as t\nvars(t)['fit'] = 1",
    "sys_modules": "import sys as s\nm = s.modules\nm['course_lib'] = None",
    "sys_modules_deep": "import os\nos.sys.modules['x'] = 1",
    "builtins": "__builtins__['abs'] = max",
    "function_type": "from types import FunctionType as F\nf = F((lambda: 1).__code__, {})",
    "delegation": "from course_lib import train\nmine = dict(train.fit.__globals__)",
    "ctypes": "import ctypes as c\nc.pythonapi",
    "frames": "import sys\ndef f():\n    return sys._getframe(1).f_globals",
    "dynamic": "getattr(__import__('builtins'), 'setattr')",
    "history": "print(In[-3:])",
    "equal_always": "class A(str):\n    __eq__ = lambda self, o: True",
}


def test_tamper_scanner_finds_every_class_and_no_honest_code():
    from grading_cli.nbmeta import kind_of
    from grading_cli.tamper import scan_sources, shadowing_files

    missed = [k for k, src in ATTACKS.items() if not scan_sources([("cell 3", src)])]
    assert not missed, missed
    hit = scan_sources([("cell 3", "import numpy as np")]) + scan_sources([(None, "import numpy as np"),
                                                                          ("cell 7", "\n\nnp.allclose = 1")])
    assert [str(h) for h in hit] == ["cell 7, line 3: patches numpy.allclose"], "where = cell and line"
    honest = ["%matplotlib inline\nimport numpy as np\nx = np.zeros(3)\nx[0] = 1",
              "import torch\nfrom torch import nn\nclass M(nn.Module):\n    def __init__(self):\n"
              "        super().__init__()\n        self.l = nn.Linear(2, 2)\n"
              "    def forward(self, x):\n        return self.l(x)",
              "import matplotlib.pyplot as plt\nplt.rcParams['figure.figsize'] = (4, 3)",
              "from IPython.display import display, Markdown\ndisplay(Markdown('**x**'))",
              "def f(input, type=None):\n    max_ = max(input)\n    return max_"]
    assert [scan_sources([("c", src)]) for src in honest] == [[]] * len(honest)
    answers = []  # every instructor solution of the course: honest learner code
    for path in sorted((ROOT / "solutions").glob("*/*.ipynb")):
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type == "code" and kind_of(cell.metadata.get("nbgrader", {})) == "solution":
                answers.append((f"{path.stem} cell {i + 1}", cell.source))
    assert not scan_sources(answers), scan_sources(answers)
    files = {"course_lib/__init__.py": b"", "torch.py": b"", "numpy/core.py": b"", "x.pth": b"", "helper.py": b"",
             "data/points.csv": b"", "my_utils.py": b""}
    assert shadowing_files(files) == ["course_lib/__init__.py", "numpy/core.py", "torch.py", "x.pth"]


def test_collect_reads_only_regular_files_inside(graded, tmp_path):
    """Links to solutions/, the gradebook or a classmate, and hard links, are never read (collect runs as root)."""
    specs = {a: assignment_spec(graded["course"], a) for a in ("01_alpha", "02_beta")}
    course = graded["course"]
    cls = tmp_path / "class"
    mine = cls / "mallory" / "01_alpha"
    mine.mkdir(parents=True)
    shutil.copy(graded["base"] / "cohort" / "blank" / "01_alpha" / "01_alpha.ipynb", mine / "01_alpha.ipynb")
    (mine / "solutions").symlink_to(course.source)
    (mine / "gradebook.db").symlink_to(course.root / "gradebook.db")
    (mine / "notes.txt").symlink_to(graded["base"] / "cohort" / "correct" / "01_alpha" / "01_alpha.ipynb")
    os.link(course.root / "grades.csv", mine / "grades.csv")
    thief = cls / "trudy" / "02_beta"
    thief.mkdir(parents=True)
    (thief / "02_beta.ipynb").symlink_to(graded["base"] / "cohort" / "correct" / "02_beta" / "02_beta.ipynb")
    subs, problems = collect(cls, specs)
    assert [(s.student, s.assignment, sorted(s.files)) for s in subs] == [("mallory", "01_alpha", ["01_alpha.ipynb"])]
    assert len(problems) == 5 and all("link" in p for p in problems), problems


def test_grading_below_full_needs_unsafe():
    with pytest.raises(ValueError, match="--unsafe"):
        driver.check_level("none", False)
    assert driver.check_level("none", True) == "none"
    sub = {"student": "x", "assignment": "02_beta", "files": {}}
    assert grade_one({"notebooks": [], "files": {}}, sub, {"isolation": "none"})["status"] == "error"


VIEW_PROBE = """
import os, sys
seen = {p: os.path.exists(p) for p in sys.argv_paths}
wrote = []
for p in sys.argv_writes:
    try:
        with open(p, "w") as f:
            f.write("planted")
        wrote.append(p)
    except OSError:
        pass
import course_lib
print("VIEW", sorted(p for p, ok in seen.items() if ok), wrote, os.getuid() != 0)
"""


@pytest.mark.parametrize("level", ["full", "net"])
def test_kernel_sees_an_allow_list_and_writes_only_its_job(level, graded, tmp_path):
    """The course root, solutions/, a submissions zip, other checkouts and /run/lock do not exist for the kernel;
    the venv, course_lib and the system are read-only; what it writes outside its job dies with it."""
    try:
        probe_isolation(level)
    except RuntimeError:
        pytest.skip(f"level {level!r} is not available here")
    archive = tmp_path / "class.zip"
    archive.write_bytes(b"PK")
    others = [str(p) for p in sorted(ROOT.parent.iterdir()) if p != ROOT][:3]  # e.g. other checkouts
    paths = [str(graded["course"].root), str(ROOT / "solutions"), str(ROOT / ".git"), str(ROOT / "tests"),
             str(archive), "/run/lock", os.path.expanduser("~/.ssh"), *others]
    writes = [str(graded["course"].root / "gradebook.db"), f"{sys.prefix}/lib/evil.pth",
              str(Path(__import__("course_lib").__file__).parent / "evil.py"), "/etc/evil", "/run/lock/evil",
              "/tmp/evil"]
    code = f"import sys\nsys.argv_paths = {paths!r}\nsys.argv_writes = {writes!r}\n" + VIEW_PROBE
    nb = new_notebook(cells=[new_code_cell(code)])
    run = execute_notebook(nb, {}, level=level, limits=Limits(cell_timeout=120))
    out = "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert run["statuses"] == ["ok"], (run, nb.cells[0].outputs)
    assert "VIEW [] ['/tmp/evil'] True" in out, out  # /tmp is the sandbox's own small tmpfs
    assert not Path("/tmp/evil").exists() and not Path("/run/lock/evil").exists()


def test_totals_per_submission():
    """Memory of all processes together, the number of processes and the bytes written are limited per
    submission (the sandbox's PID 1 kills every process over a total)."""
    level = probe_isolation("auto")
    if level == "none":
        pytest.skip("the totals need the full or net sandbox (a PID namespace)")
    cases = {
        "memory": ("import subprocess, sys, time\nps = [subprocess.Popen([sys.executable, '-c', "
                   "'import time; x = b\"x\" * (250 * 2**20); time.sleep(60)']) for _ in range(3)]\ntime.sleep(30)",
                   Limits(cell_timeout=60, total_memory_mb=500), "memory"),
        "processes": ("import subprocess, time\nps = [subprocess.Popen(['sleep', '60']) for _ in range(20)]\n"
                      "time.sleep(30)", Limits(cell_timeout=60, max_processes=10), "processes"),
        "disk": ("import time\nwith open('big.bin', 'wb') as f:\n    for _ in range(80):\n"
                 "        f.write(b'x' * 2**20)\n        f.flush()\ntime.sleep(30)",
                 Limits(cell_timeout=60, disk_mb=40), "written"),
    }
    for name, (code, limits, word) in cases.items():
        nb = new_notebook(cells=[new_code_cell(code), new_code_cell("print('after')")])
        t0 = time.monotonic()
        run = execute_notebook(nb, {}, level=level, limits=limits)
        assert ("limit_exceeded", -1) in run["events"], (name, run)
        assert word in run["kernel_log"] and run["statuses"] == ["died", "not_run"], (name, run)
        assert time.monotonic() - t0 < 30, name


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
            if name.endswith(".ipynb"):  # a flat LMS download holds notebooks only
                (flat / f"{s.student}_{name}").write_bytes(data)
    archive = tmp_path / "class.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for s in nested:
            for name, data in s.files.items():
                zf.writestr(f"download/{s.student}/{s.assignment}/{name}", data)
        zf.writestr("../evil.ipynb", b"{}")
    flat_subs, _ = collect(flat, specs)
    zip_subs, _ = collect(archive, specs)

    def key(subs, notebooks_only=False):
        return {(s.student, s.assignment, tuple(sorted(v for k, v in s.files.items()
                                                       if k.endswith(".ipynb") or not notebooks_only))) for s in subs}

    assert key(nested) == key(zip_subs) and key(nested, True) == key(flat_subs, True)
    assert "course_lib/__init__.py" in next(s for s in zip_subs if s.student == "shadow_package").files
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


def test_make_release_is_the_one_release_command():
    """make release = python -m grading_cli release: nbgrader and the checks' expected values in one step."""
    proc = subprocess.run(["make", "-n", "release"], cwd=ROOT, capture_output=True, text=True)
    assert "-m grading_cli release" in proc.stdout and "generate_assignment" not in proc.stdout, proc.stdout


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


def test_checked_test_cells_send_no_hidden_line_to_the_kernel(specs):
    """A test cell with a grader-side check runs only its visible part in the kernel (plus, for a decision,
    a cell that prints the answers): the hidden source is in no cell the kernel gets."""
    for spec in specs.values():
        nbspec = spec["notebooks"][0]
        assert nbspec["checks"], "every fixture test cell has a check"
        by_id = {r["grade_id"]: r for r in nbspec["cells"] if r["grade_id"]}
        cells = [nbformat.from_dict({"cell_type": r["cell_type"], "source": r["full"], "metadata": r["metadata"],
                                     **({"outputs": [], "execution_count": None} if r["cell_type"] == "code" else {})})
                 for r in nbspec["cells"]]
        exec_nb, where = build_exec(cells, by_id, {}, nbspec["checks"])
        sent = "\n".join(c.source for c in exec_nb.cells)
        secret = {ln.strip() for r in nbspec["cells"] if r["kind"] == "test"
                  for h, code in split_hidden(r["full"]) if h for ln in code.split("\n") if len(ln.strip()) > 10}
        assert secret and not [x for x in secret if x in sent]
        kinds = {c["kind"] for c in nbspec["checks"].values()}
        assert kinds == {"exercise", "decision"} and sum(part == "answers" for _, part in where) == sum(
            c["kind"] == "decision" for c in nbspec["checks"].values())
        assert all("expected" in c and "expected" not in json.dumps({k: v for k, v in c.items() if k != "expected"})
                   for c in nbspec["checks"].values())


def test_same_compares_plain_data_strictly():
    from grading_cli.checks import same

    assert same(1, 1.0, 0, 1e-9) and same(0.5 + 1e-12, 0.5, 0, 1e-9) and not same(0.6, 0.5, 0, 1e-9)
    assert not same(True, 1, 0, 0) and not same(1, True, 0, 0) and not same(True, 1.0, 0, 1)
    assert same({"float": "nan"}, {"float": "nan"}, 0, 0) and not same(1.0, {"float": "nan"}, 0, 1)
    t = {"tensor": "torch.float32", "shape": [2], "data": {"list": [1.0, 2.0]}}
    assert same(t, t, 1e-5, 0) and not same(dict(t, tensor="torch.float64"), t, 1e-5, 0)
    raised = {"raised": "ValueError"}
    assert not same(raised, None, 0, 0) and same(raised, dict(raised), 0, 0)
    assert not same("regularization", "optimization", 0, 0) and not same({"list": [1]}, {"list": [1, 2]}, 0, 0)


def test_stale_expected_values_are_refused(graded, tmp_path):
    course = private(graded, tmp_path)
    path = course.root / "expected" / "01_alpha.json"
    stored = json.loads(path.read_text())
    stored["ex1_warmup_tests"]["fingerprint"] = "0" * 16  # as after the solution or the check changed
    path.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="make release"):
        assignment_spec(course, "01_alpha")
    path.unlink()
    with pytest.raises(ValueError, match="make release"):
        assignment_spec(course, "01_alpha")


DELEGATE = {  # answers that hand the exercise to course_lib's reference (issue 14: they passed in the kernel)
    "n00_warmup_cosine": "def warmup_cosine(step, warmup_steps, total_steps):\n"
                         "    from course_lib.scenarios import recipe\n    import course_lib.schedules as s\n"
                         "    return s.warmup_cosine_multiplier(step, warmup_steps, total_steps)",
    "n03_clip_global_norm": "import torch\n\n\ndef clip_global_norm_(parameters, max_norm):\n"
                            "    return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)",
    "n01_ex_adam_step": "from course_lib.scenarios.memorize import torch_adam_step as adam_step",
    "n04_ex_best_epoch": "from course_lib.scenarios.memorize import best_epoch_from_rows\n\n\n"
                         "def choose_best_epoch(history_rows, metric='val_loss', mode='min'):\n"
                         "    return best_epoch_from_rows(history_rows, metric, mode)",
    "n01_ex_no_decay": "def no_decay_groups(model, weight_decay):\n"
                       "    return [{'params': g['params'], 'weight_decay': g['weight_decay']}\n"
                       "            for g in param_groups(model, lr=1e-3, weight_decay=weight_decay)]",
    "n08_ex_select_best": "def select_best(results, metric='val_loss', mode='min'):\n"
                          "    return course_select_best(results, metric, mode)",
    "n05_set_trainable": "def set_trainable_top_k(model, k):\n    unfreeze_top_k(model, k)\n    return model",
    "n10_nf4_block": "def nf4_quantize_block(block):\n    return qlora.nf4_quantize_block(block)",
    "n07_quantize_block": "def quantize_block(block, code_map):\n"
                          "    return scenario.quantize_block(block, code_map)\n\n\n"
                          "def dequantize_block(codes, absmax, code_map):\n"
                          "    return scenario.dequantize_block(codes, absmax, code_map)",
}


def test_course_checks_pass_the_solutions_only():
    """Every grader-side check of the course: the expected values come from the solutions (fresh process);
    in the sandbox the solution passes, the released stub fails, and delegating to the reference fails."""
    from grading_cli.checks import COURSE, compare, job_for, read_results, run_trusted, solution_job, solution_region
    from grading_cli.execute import run_checks

    rows, expected, per = [], {}, []
    for assignment, checks in COURSE.items():
        path = ROOT / "solutions" / assignment / f"{assignment}.ipynb"
        if path.exists():
            jobs, _, skipped = solution_job(path, checks)
            assert not skipped, skipped
            per.append((path, checks, jobs))
    got = run_trusted(job_for([row for _, _, jobs in per for row in jobs]))  # one process: each in a fresh namespace
    for path, checks, jobs in per:
        for row in jobs:
            assert "__load__" not in got[row["test"]], got[row["test"]]
            if row["kind"] == "decision":
                assert all(isinstance(got[row["test"]][n], (str, int, float)) for n in row["names"]), got
                continue
            check = dict(row, expected=got[row["test"]], rtol=checks[row["test"]].rtol,
                         atol=checks[row["test"]].atol)
            expected[row["test"]] = check
            source = nbformat.read(path, as_version=4)
            answer_id = checks[row["test"]].answer
            cell = next(c for c in source.cells if c.metadata.get("nbgrader", {}).get("grade_id") == answer_id)
            stub = cell.source.replace(solution_region(cell.source), "")
            stub = "\n".join("    raise NotImplementedError()" if ln.strip() == "### BEGIN SOLUTION" else ln
                             for ln in stub.split("\n") if ln.strip() != "### END SOLUTION")
            variants = {"solution": row["answer"], "stub": stub}
            if answer_id in DELEGATE:
                variants["delegate"] = DELEGATE[answer_id]
            for name, answer in variants.items():
                rows.append(dict(row, test=f"{row['test']}|{name}", answer=answer))
    assert {t.split("|")[0] for t in expected} >= {"n00_warmup_cosine_tests", "n04_ex_best_epoch_tests"} or not rows
    level = probe_isolation("auto")
    run = run_checks(job_for(rows, 60), {}, level=level, timeout=600)
    results = read_results(run["output"])
    for row in rows:
        test, variant = row["test"].split("|")
        ok, why = compare(expected[test], results.get(row["test"]))
        assert ok == (variant == "solution"), (row["test"], why)


def _history_csv(values, metric="val_acc") -> bytes:
    return ("epoch,lr," + metric + ",seconds\n" + "".join(f"{e},0.003,{v!r},0.1\n" for e, v in enumerate(values, 1))
            ).encode()


def test_evidence_rules_use_only_plain_evidence(tmp_path):
    """Run-dependent answers (04): the expected value comes from the parameters cell's literals and the
    files the run wrote, computed in the grader's process; missing, linked or inconsistent evidence -> 0."""
    import random

    from course_lib.scenarios import diagnosis
    from course_lib.scenarios.memorize import NOISY, best_epoch_from_rows, stop_epoch_from_rows
    from grading_cli.evidence import Run, Unavailable, expected_for, notebook_parameters, read_evidence
    from grading_cli.score import _compare_evidence

    cell = lambda src, tags=("parameters",): nbformat.from_dict(  # noqa: E731
        {"cell_type": "code", "source": src, "metadata": {"tags": list(tags)}, "outputs": [], "execution_count": None})
    params = notebook_parameters([cell("seed = 3\nfast = is_fast()\nout_dir = 'art'"), cell("seed = 9", ())],
                                 {"fast": True})
    assert params["seed"] == 3 and params["out_dir"] == "art" and params["fast"] is True
    assert expected_for("n04_diagnosis", Run(params)) == {"diagnosis": dict(sorted(diagnosis.planted(3).items()))}
    for src in ("seed = int('3')", "seed = SEED", "seed = True"):
        with pytest.raises(Unavailable, match="literal int"):
            expected_for("n04_diagnosis", Run(notebook_parameters([cell(src)])))
    check = {"test": "t", "names": ["diagnosis"], "rule": "n04_diagnosis", "rtol": 1e-9, "atol": 0.0}
    right = dict(reversed(list(diagnosis.planted(3).items())))  # key order does not matter
    assert _compare_evidence(check, {"diagnosis": right}, Run(params)) == (True, "")
    wrong = {k: right[k2] for k, k2 in zip(sorted(right), sorted(right)[1:] + sorted(right)[:1])}
    assert not _compare_evidence(check, {"diagnosis": wrong}, Run(params))[0]
    assert not _compare_evidence(check, {"diagnosis": right}, Run({"seed": 4}))[0] or \
        diagnosis.planted(4) == diagnosis.planted(3)

    rng = random.Random(0)
    for _ in range(20):
        values = [round(rng.random(), 2) for _ in range(60)]
        stop = stop_epoch_from_rows([{"epoch": e, "val_acc": v} for e, v in enumerate(values, 1)], "val_acc", "max",
                                    NOISY["patience"])
        files = {"artifacts/noisy_labels_history.csv": _history_csv(values)}
        if stop is not None:
            files["artifacts/patience_history.csv"] = _history_csv(values[:stop])
        run = Run({"out_dir": "artifacts", "seed": 0}, files)
        want = best_epoch_from_rows([{"epoch": e, "val_acc": v} for e, v in enumerate(values, 1)], "val_acc", "max")
        assert expected_for("n04_best_epoch", run) == {"best_epoch": want}
        if stop is not None:
            assert expected_for("n04_stop_epoch", run) == {"stop_epoch": stop}
    values = [0.5 + 0.001 * e for e in range(60)]  # never stops
    bad = {"missing": {},
           "short": {"artifacts/noisy_labels_history.csv": _history_csv(values[:30])},
           "garbage": {"artifacts/noisy_labels_history.csv": b"\x00\xff not a csv"},
           "gap": {"artifacts/noisy_labels_history.csv": _history_csv(values).replace(b"\n7,", b"\n8,")}}
    for files in bad.values():
        with pytest.raises(Unavailable):
            expected_for("n04_best_epoch", Run({"out_dir": "artifacts"}, files))
    values = [0.9] + [0.5] * 59  # stops at epoch 11 under patience 10
    noisy = {"artifacts/noisy_labels_history.csv": _history_csv(values)}
    for patience in {"did not stop": values[:20], "not the same run": [0.8] + [0.5] * 10,
                          "stopped late": values[:12]}.values():
        with pytest.raises(Unavailable):
            expected_for("n04_stop_epoch", Run({"out_dir": "artifacts"},
                                               {**noisy, "artifacts/patience_history.csv": _history_csv(patience)}))
    assert expected_for("n04_stop_epoch", Run({}, {**noisy, "artifacts/patience_history.csv": _history_csv(
        values[:11])})) == {"stop_epoch": 11}
    with pytest.raises(Unavailable, match="leaves the job folder"):
        expected_for("n04_best_epoch", Run({"out_dir": "../../grading"}, {}))

    # the grader reads evidence without following a link the kernel planted (a file or a folder)
    (tmp_path / "secret.csv").write_bytes(b"epoch,val_acc\n1,0.5\n")
    (tmp_path / "work" / "art").mkdir(parents=True)
    (tmp_path / "work" / "art" / "real.csv").write_bytes(b"ok")
    (tmp_path / "work" / "art" / "link.csv").symlink_to(tmp_path / "secret.csv")
    (tmp_path / "work" / "dirlink").symlink_to(tmp_path)
    got = read_evidence(tmp_path / "work", ["art/real.csv", "art/link.csv", "dirlink/secret.csv", "../secret.csv"])
    assert got == {"art/real.csv": b"ok"}


def test_run_dependent_answers_are_checked_by_the_grader(tmp_path):
    """Notebook 04 graded in the sandbox: the honest solution scores in full; wrong run-dependent answers
    with the references the in-kernel tests recomputed the truth from patched (planted, best/stop epoch
    rules) score 0 on those cells, and are flagged."""
    name = "04_checkpoints_early_stopping"
    if not (ROOT / "solutions" / name / f"{name}.ipynb").exists():
        pytest.skip("no notebook 04")
    root = tmp_path / "course"
    (root / "grading").mkdir(parents=True)
    shutil.copy(ROOT / "grading" / "nbgrader_config.py", root / "grading")
    shutil.copytree(ROOT / "solutions" / name, root / "solutions" / name,
                    ignore=shutil.ignore_patterns("artifacts", "*.pt", "*.png", ".ipynb_checkpoints"))
    course = Course.load(root / "grading")
    course.release_all([name])
    stored = json.loads((course.root / "expected" / f"{name}.json").read_text())
    assert {t for t, e in stored.items() if "skipped" not in e} >= {
        "n04_diagnosis_tests", "n04_decision_best_epoch", "n04_decision_stop_epoch"}, stored
    expected = [r for r in make_cohort(tmp_path / "cohort", course.root, [name], ["correct", "patch_truth"])
                if r["student"] != "missing_student"]
    options = dict(OPTIONS, limits={"cell_timeout": 600, "notebook_timeout": 1200})
    driver.grade(course, tmp_path / "cohort", workers=2, options=options)
    got = read_csv(course.root / "grades.csv")
    by = {e["student"]: e for e in expected}
    assert set(by) == {"correct", "patch_truth"}
    for e in expected:
        row = got[(e["student"], name)]
        assert float(row["score"]) == float(e["score"]), (e, row)
    assert float(by["patch_truth"]["score"]) < float(by["correct"]["score"])
    assert "suspicious_code" in got[("patch_truth", name)]["flags"]
    assert not set(got[("correct", name)]["flags"].split(";")) & TAMPER
