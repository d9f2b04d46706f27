"""Two small nbgrader assignments, written like the course's notebooks, in a throw-away course root.

They run in about a second each, so the cohort can cover every case the autograder must handle. Cell
conventions are the course's (see tools/sync_notebooks.py): a Colab badge, a setup cell, a ``parameters``
cell, answers with ``### BEGIN SOLUTION``, tests with ``### BEGIN HIDDEN TESTS``, a manually graded note,
the decisions written to ``out_dir``. Unlike the course's notebooks they do not import course_lib (torch).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import sync_notebooks  # noqa: E402


def _meta(grade_id, *, grade, solution, locked, points=None):
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3, "solution": solution,
            "task": False}
    if points is not None:
        meta["points"] = points
    return meta


class _Builder:
    def __init__(self, name: str):
        self.name, self.nb = name, new_notebook()
        self.nb.metadata = {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                                           "name": "python3"}, "language_info": {"name": "python"}}

    def add(self, cell, nbgrader=None, tags=()):
        if nbgrader:
            cell.metadata["nbgrader"] = nbgrader
            if nbgrader["locked"]:
                cell.metadata.update(editable=False, deletable=False)
        if tags:
            cell.metadata["tags"] = list(tags)
        self.nb.cells.append(cell)

    def header(self, intro: str):
        self.add(new_markdown_cell(sync_notebooks.badge_source(self.name)), tags=["colab-badge"])
        self.add(new_markdown_cell(intro))
        self.add(new_code_cell(sync_notebooks.setup_source()), tags=["course-setup"])
        self.add(new_code_cell(
            "# Parameters (papermill and the grader override these)\nimport os\n\n"
            'fast = os.environ.get("COURSE_FAST", "0").strip().lower() in ("1", "true", "yes")\n'
            f'device = "auto"\nseed = 0\nout_dir = "artifacts/{self.name}"'), tags=["parameters"])
        # The course's notebooks import course_lib here (and with it torch); these fixtures only need the
        # labels, which keeps a cohort of thirty kernels cheap. tests/test_grading.py grades real notebooks too.
        self.add(new_code_cell('BOTTLENECKS = ("optimization", "regularization", "adaptation")\n'
                               'print(f"fast={fast} device={device} seed={seed}")'))

    def solution(self, src, gid):
        self.add(new_code_cell(src), _meta(gid, grade=False, solution=True, locked=False))

    def tests(self, src, gid, points):
        self.add(new_code_cell(src), _meta(gid, grade=True, solution=False, locked=True, points=points))

    def readonly(self, src, gid):
        self.add(new_code_cell(src), _meta(gid, grade=False, solution=False, locked=True))

    def manual(self, gid, points):
        self.add(new_markdown_cell("### BEGIN SOLUTION\nA short recipe note.\n### END SOLUTION"),
                 _meta(gid, grade=True, solution=True, locked=False, points=points))

    def write(self, root: Path) -> Path:
        path = root / "solutions" / self.name / f"{self.name}.ipynb"
        path.parent.mkdir(parents=True, exist_ok=True)
        for i, cell in enumerate(self.nb.cells):
            cell["id"] = f"{self.name[:2]}-{i:02d}"
        nbformat.validate(self.nb)
        nbformat.write(self.nb, path)
        return path


def alpha() -> _Builder:
    """01_alpha: two code exercises (2 + 2 points), a bottleneck decision (2), a note (2 by hand)."""
    b = _Builder("01_alpha")
    b.header("# 01 Alpha (fixture)\nA warmup factor, the best epoch, and a decision.")
    b.add(new_markdown_cell("## Exercise 1: linear warmup factor"))
    b.solution('def warmup_factor(step, warmup_steps):\n    """step / warmup_steps, capped at 1; 1 without warmup."""\n'
               "    ### BEGIN SOLUTION\n    if warmup_steps == 0:\n        return 1.0\n"
               "    return min(1.0, step / warmup_steps)\n    ### END SOLUTION", "ex1_warmup")
    b.tests("assert callable(warmup_factor)\nassert abs(warmup_factor(0, 10)) < 1e-12\n"
            "### BEGIN HIDDEN TESTS\nfor s, w, want in [(5, 10, 0.5), (10, 10, 1.0), (50, 10, 1.0), (3, 0, 1.0)]:\n"
            "    got = warmup_factor(s, w)\n    assert type(got) in (int, float) and abs(got - want) < 1e-9, (s, w)\n"
            "### END HIDDEN TESTS", "ex1_warmup_tests", 2)
    b.add(new_markdown_cell("## Exercise 2: the epoch you would keep"))
    b.solution('def best_epoch(val_losses):\n    """Index of the lowest validation loss (the earliest on ties)."""\n'
               "    ### BEGIN SOLUTION\n    return min(range(len(val_losses)), key=lambda i: (val_losses[i], i))\n"
               "    ### END SOLUTION", "ex2_best")
    b.tests("assert best_epoch([3.0, 2.0, 2.5]) == 1\n### BEGIN HIDDEN TESTS\n"
            "assert type(best_epoch([1.0])) is int and best_epoch([1.0]) == 0\n"
            "assert best_epoch([2.0, 1.0, 1.0, 3.0]) == 1\nassert best_epoch([5.0, 4.0, 3.0]) == 2\n"
            "### END HIDDEN TESTS", "ex2_best_tests", 2)
    b.add(new_code_cell("history = {'train_loss': [1.0, 0.5, 0.2, 0.05], 'val_loss': [1.1, 0.8, 0.9, 1.2]}\n"
                        "print('best epoch:', best_epoch(history['val_loss']))"))
    b.add(new_markdown_cell("## Decision\nTraining loss falls while validation loss rises: which bottleneck?"))
    b.solution('# One of BOTTLENECKS\n### BEGIN SOLUTION\nbottleneck = "regularization"\n### END SOLUTION', "decision")
    b.tests('assert bottleneck in BOTTLENECKS, f"bottleneck must be one of {BOTTLENECKS}"\n'
            "### BEGIN HIDDEN TESTS\nassert type(bottleneck) is str and bottleneck == \"regularization\"\n"
            "### END HIDDEN TESTS", "decision_tests", 2)
    b.manual("recipe_note", 2)
    b.add(new_code_cell("import json, pathlib\n\nfolder = pathlib.Path(out_dir)\n"
                        "folder.mkdir(parents=True, exist_ok=True)\n"
                        "(folder / 'decisions.json').write_text(json.dumps({'bottleneck': bottleneck}))"))
    return b


def beta() -> _Builder:
    """02_beta: a read-only history, a LoRA count (3), the best epoch from it (1), a bottleneck (2), a note (1)."""
    b = _Builder("02_beta")
    b.header("# 02 Beta (fixture)\nCount adapter parameters and read a history.")
    b.readonly("VAL_LOSS = [0.9, 0.7, 0.6, 0.65, 0.7]  # read-only: the tests use it", "history")
    b.add(new_markdown_cell("## Exercise 1: LoRA parameters of one Linear(d_in, d_out) at rank r"))
    b.solution('def lora_params(d_in, d_out, r):\n    """r * (d_in + d_out): A is (r, d_in), B is (d_out, r)."""\n'
               "    ### BEGIN SOLUTION\n    return r * (d_in + d_out)\n    ### END SOLUTION", "ex1_lora")
    b.tests("assert lora_params(4, 4, 1) == 8\n### BEGIN HIDDEN TESTS\n"
            "assert lora_params(768, 3072, 8) == 30720 and lora_params(10, 2, 3) == 36\n"
            "### END HIDDEN TESTS", "ex1_lora_tests", 3)
    b.solution("# The epoch you would keep (an int index into VAL_LOSS)\n### BEGIN SOLUTION\n"
               "best = min(range(len(VAL_LOSS)), key=VAL_LOSS.__getitem__)\n### END SOLUTION", "decision_epoch")
    b.tests("assert isinstance(best, int) and 0 <= best < len(VAL_LOSS)\n### BEGIN HIDDEN TESTS\n"
            "assert type(best) is int and best == min(range(len(VAL_LOSS)), key=VAL_LOSS.__getitem__)\n"
            "### END HIDDEN TESTS", "decision_epoch_tests", 1)
    b.solution('# Frozen features are not enough: which bottleneck?\n### BEGIN SOLUTION\nbottleneck = "adaptation"\n'
               "### END SOLUTION", "decision_bottleneck")
    b.tests("assert bottleneck in BOTTLENECKS\n### BEGIN HIDDEN TESTS\n"
            'assert type(bottleneck) is str and bottleneck == "adaptation"\n### END HIDDEN TESTS',
            "decision_bottleneck_tests", 2)
    b.manual("recipe_note", 1)
    return b


# The fixtures' grader-side checks (grading_cli.checks): every hidden test of both fixtures is checked
# outside the learner's kernel, so the cohort exercises both kinds (code exercises, fixed decisions).
GRADER_CHECKS = '''from grading_cli.checks import Decision, Exercise

WARMUP = """
def cases(f):
    for s, w in [(0, 10), (5, 10), (10, 10), (50, 10), (3, 0)]:
        yield f"step={s} warmup={w}", lambda s=s, w=w: f.warmup_factor(s, w)
"""
BEST = """
def cases(f):
    for losses in ([1.0], [2.0, 1.0, 1.0, 3.0], [5.0, 4.0, 3.0], [3.0, 2.0, 2.5]):
        yield str(losses), lambda losses=losses: f.best_epoch(list(losses))
"""
LORA = """
def cases(f):
    for args in ((768, 3072, 8), (10, 2, 3), (4, 4, 1)):
        yield str(args), lambda args=args: f.lora_params(*args)
"""
CHECKS = {
    "01_alpha": {
        "ex1_warmup_tests": Exercise("ex1_warmup_tests", "ex1_warmup", WARMUP, rtol=0.0, atol=1e-9),
        "ex2_best_tests": Exercise("ex2_best_tests", "ex2_best", BEST),
        "decision_tests": Decision("decision_tests", "decision", ("bottleneck",)),
    },
    "02_beta": {
        "ex1_lora_tests": Exercise("ex1_lora_tests", "ex1_lora", LORA),
        "decision_epoch_tests": Decision("decision_epoch_tests", "decision_epoch", ("best",), context=("history",)),
        "decision_bottleneck_tests": Decision("decision_bottleneck_tests", "decision_bottleneck", ("bottleneck",)),
    },
}
'''


def build_course(root: Path, release: bool = True) -> Path:
    """A course root at ``root`` (grading/, solutions/, notebooks/) with both fixtures; returns grading/."""
    (root / "grading").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "grading" / "nbgrader_config.py", root / "grading" / "nbgrader_config.py")
    (root / "grading" / "grader_checks.py").write_text(GRADER_CHECKS)
    for b in (alpha(), beta()):
        b.write(root)
    if release:
        from grading_cli.course import Course

        Course.load(root / "grading").release_all()
    return root / "grading"
