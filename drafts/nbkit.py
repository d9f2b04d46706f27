"""Scaffolding to write nbgrader source notebooks (solutions/NN_name/NN_name.ipynb) from Python.

NOT committed: the .ipynb in solutions/ is the single source of truth. Usage in a build script:

    import sys; sys.path.insert(0, "/tmp/nbsrc")
    from nbkit import Notebook
    nb = Notebook("00_recipe_demo")
    nb.header("# 00 Recipe demo ...intro markdown...", out_dir_default="artifacts/00_recipe_demo")
    nb.md("...")
    nb.code("...")                                 # ordinary code cell (learner may edit)
    nb.solution('''def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION''', "ex1_f")
    nb.tests('''assert f(1) == 1\n### BEGIN HIDDEN TESTS\nassert f(2) == 2\n### END HIDDEN TESTS''', "ex1_f_tests", points=2)
    nb.manual("YOUR ANSWER HERE", "recipe_note", points=2)   # manually graded markdown answer
    nb.write()
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path("/work/main")
sys.path.insert(0, str(ROOT / "tools"))
import sync_notebooks  # noqa: E402


def _nbg(grade_id, *, grade, solution, locked, points=None, task=False):
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3,
            "solution": solution, "task": task}
    if points is not None:
        meta["points"] = points
    return meta


class Notebook:
    def __init__(self, name: str):
        self.name = name
        self.nb = new_notebook()
        self.nb.metadata = {
            "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        }
        self.ids: set[str] = set()

    def _add(self, cell, tags=()):
        if tags:
            cell.metadata["tags"] = list(tags)
        cell.pop("id", None)
        self.nb.cells.append(cell)
        return cell

    def _check_id(self, grade_id):
        if grade_id in self.ids:
            raise ValueError(f"duplicate grade_id {grade_id}")
        self.ids.add(grade_id)

    def header(self, intro_md: str, out_dir_default: str, extra_params: str = ""):
        """Badge, intro, setup cell, parameters cell, imports + version check + seed."""
        self._add(new_markdown_cell(sync_notebooks.badge_source(self.name)), tags=["colab-badge"])
        self.md(intro_md)
        self._add(new_code_cell(sync_notebooks.setup_source()), tags=["course-setup"])
        params = (
            "# Parameters (papermill and the grader override these; `fast` is quick, the default is the full run)\n"
            "import os\n\n"
            'fast = os.environ.get("COURSE_FAST", "0").strip().lower() in ("1", "true", "yes")\n'
            'device = "auto"  # "auto" picks cuda > mps > cpu\n'
            "seed = 0\n"
            f'out_dir = "{out_dir_default}"\n' + extra_params)
        self._add(new_code_cell(params.rstrip() + "\n"), tags=["parameters"])
        self.code(
            "import course_lib\n\n"
            f'course_lib.check_version("{sync_notebooks.required_version()}")  # stops with update instructions if not\n'
            "from course_lib import BOTTLENECKS, get_device, seed_everything\n\n"
            "DEVICE = get_device(device)\n"
            "seed_everything(seed)\n"
            'print(f"course_lib {course_lib.__version__} | device {DEVICE} | fast={fast} | seed={seed}")')

    def md(self, src: str):
        return self._add(new_markdown_cell(src.strip("\n")))

    def code(self, src: str, tags=()):
        return self._add(new_code_cell(src.strip("\n")), tags)

    def readonly(self, src: str, grade_id: str):
        """A locked code cell learners should not change (e.g. a helper the tests rely on)."""
        self._check_id(grade_id)
        c = self._add(new_code_cell(src.strip("\n")))
        c.metadata["nbgrader"] = _nbg(grade_id, grade=False, solution=False, locked=True)
        c.metadata["editable"] = False
        c.metadata["deletable"] = False
        return c

    def solution(self, src: str, grade_id: str):
        """Autograded answer: code with ### BEGIN SOLUTION / ### END SOLUTION regions."""
        if "### BEGIN SOLUTION" not in src:
            raise ValueError(f"{grade_id}: a solution cell needs ### BEGIN SOLUTION / ### END SOLUTION")
        self._check_id(grade_id)
        c = self._add(new_code_cell(src.strip("\n")))
        c.metadata["nbgrader"] = _nbg(grade_id, grade=False, solution=True, locked=False)
        return c

    def tests(self, src: str, grade_id: str, points: int):
        """Autograded tests: visible asserts, then ### BEGIN HIDDEN TESTS ... ### END HIDDEN TESTS."""
        self._check_id(grade_id)
        c = self._add(new_code_cell(src.strip("\n")))
        c.metadata["nbgrader"] = _nbg(grade_id, grade=True, solution=False, locked=True, points=points)
        c.metadata["editable"] = False
        c.metadata["deletable"] = False
        return c

    def manual(self, src: str, grade_id: str, points: int):
        """Manually graded markdown answer (the recipe note)."""
        self._check_id(grade_id)
        c = self._add(new_markdown_cell(src.strip("\n")))
        c.metadata["nbgrader"] = _nbg(grade_id, grade=True, solution=True, locked=False, points=points)
        return c

    def write(self) -> Path:
        out = ROOT / "solutions" / self.name / f"{self.name}.ipynb"
        out.parent.mkdir(parents=True, exist_ok=True)
        for i, cell in enumerate(self.nb.cells):
            cell["id"] = f"{self.name[:2]}-{i:02d}"  # stable ids: no churn in diffs
        nbformat.validate(self.nb)
        nbformat.write(self.nb, out)
        return out
