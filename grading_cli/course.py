"""The course as nbgrader sees it: config, release, gradebook, and the per-assignment spec sent to workers."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

from .checks import load_expected
from .nbmeta import kind_of

REPO = Path(__file__).resolve().parents[1]
MAX_RELEASED_FILES = 64 * 2**20


def tool_env() -> dict:
    """nbgrader runs ``alembic`` from PATH when it creates a gradebook: put this interpreter's bin/ first."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@dataclass
class Course:
    root: Path
    release: Path
    source: Path
    db_url: str
    course_id: str

    @classmethod
    def load(cls, root=REPO / "grading") -> Course:
        from traitlets.config.loader import PyFileConfigLoader

        root = Path(root).resolve()
        if not (root / "nbgrader_config.py").exists():
            raise ValueError(f"course_root must hold nbgrader_config.py, got {root}")
        c = PyFileConfigLoader("nbgrader_config.py", path=str(root)).load_config().CourseDirectory
        base = Path(c.get("root", root))

        def rel(key: str, default: str) -> Path:
            return (base / c.get(key, default)).resolve()

        return cls(base, rel("release_directory", "release"), rel("source_directory", "source"),
                   c.get("db_url", f"sqlite:///{base / 'gradebook.db'}"), c.get("course_id", "default_course"))

    def gradebook(self):
        os.environ["PATH"] = tool_env()["PATH"]
        from nbgrader.api import Gradebook

        return Gradebook(self.db_url, course_id=self.course_id)

    def source_assignments(self) -> list[str]:
        return sorted(p.name for p in self.source.glob("*/") if list(p.glob("*.ipynb")))

    def released_assignments(self) -> list[str]:
        with self.gradebook() as gb:
            names = [a.name for a in gb.assignments]
        return sorted(a for a in names if (self.release / a).is_dir())

    def release_all(self, names=None) -> list[str]:
        """The one release step (``make release``): for each assignment ``nbgrader generate_assignment --force``,
        then the expected values of its grader-side checks, computed from the solutions in a fresh process
        (``checks.compute_expected``: ``<course root>/expected/<assignment>.json``, never inside a sandbox)."""
        from .checks import compute_expected

        names = list(names or self.source_assignments())
        for name in names:
            proc = subprocess.run([str(Path(sys.executable).parent / "nbgrader"), "generate_assignment", name,
                                   "--force", "--log-level=WARN"], cwd=self.root, env=tool_env(),
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"nbgrader generate_assignment {name} failed:\n{proc.stdout}{proc.stderr}")
            compute_expected(self, name)
        return names


def _hints(path: Path) -> dict[str, str]:
    """The instructor's solution of each answer cell (markers removed): only a hint for matching cells."""
    if not path.exists():
        return {}
    nb = nbformat.read(path, as_version=4)
    out = {}
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid:
            out[gid] = "\n".join(ln for ln in cell.source.split("\n") if "### BEGIN SOLUTION" not in ln
                                 and "### END SOLUTION" not in ln)
    return out


def assignment_spec(course: Course, name: str) -> dict:
    """Everything a worker needs to grade ``name``; plain data, no paths into the course."""
    adir = course.release / name
    if not adir.is_dir():
        raise ValueError(f"assignment {name!r} is not released in {course.release}: run `make release`")
    with course.gradebook() as gb:
        try:
            assignment = gb.find_assignment(name)
        except Exception as err:
            raise ValueError(f"assignment {name!r} is not in the gradebook: run `make release`") from err
        spec = {"assignment": name, "notebooks": [], "files": {}, "max_score": float(assignment.max_score)}
        for notebook in sorted(assignment.notebooks, key=lambda n: n.name):
            path = adir / f"{notebook.name}.ipynb"
            released = nbformat.read(path, as_version=4)
            hints = _hints(course.source / name / f"{notebook.name}.ipynb")
            cells = []
            for cell in released.cells:
                meta = cell.metadata.get("nbgrader", {})
                gid = meta.get("grade_id")
                kind = kind_of(meta) or cell.cell_type
                rel = {"cell_type": cell.cell_type, "kind": kind, "grade_id": gid if kind_of(meta) else None,
                       "source": cell.source, "full": cell.source, "points": None, "hint": hints.get(gid),
                       "metadata": dict(cell.metadata), "restore": "course-setup" in cell.metadata.get("tags", [])}
                if kind in ("test", "locked"):
                    rel["full"] = gb.find_source_cell(gid, notebook.name, name).source
                if kind in ("test", "manual", "task"):
                    rel["points"] = float(gb.find_graded_cell(gid, notebook.name, name).max_score)
                cells.append(rel)
            checks = load_expected(course, name, course.source / name / f"{notebook.name}.ipynb")
            spec["notebooks"].append({"name": notebook.name, "released": nbformat.writes(released), "cells": cells,
                                      "checks": checks})
    total = 0
    for f in sorted(adir.rglob("*")):
        rel = f.relative_to(adir).as_posix()
        if f.is_file() and f.suffix != ".ipynb" and not any(p.startswith((".", "__")) for p in rel.split("/")):
            total += f.stat().st_size
            if total > MAX_RELEASED_FILES:
                raise ValueError(f"released files of {name} exceed {MAX_RELEASED_FILES >> 20} MiB")
            spec["files"][rel] = f.read_bytes()
    return spec
