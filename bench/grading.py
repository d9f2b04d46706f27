"""Grading benchmark: seconds per submission, the speedup of Dask fan-out, the cost of the grader-side checks.

Run ``python -m bench.grading`` (add ``--markdown`` for a markdown table). It builds the fixture course and
cohort of ``tests/cohort`` (two small assignments, every case of the cohort, the hostile ones included) in a
temporary folder, grades it with 1 worker, then with ``--workers`` (default: all cores), and checks that
both give the same grades.csv. ``--cases correct blank ...`` grades a subset; ``--copies N`` repeats the
cohort N times under other student names (a bigger class). ``run()`` returns figure rows for
``bench/run_all.py``.

Before/after issue 14 in one run: the same cohort is also graded with the grader-side checks off
(``options["checks"] = False``: every hidden test in the learner's kernel, as before) on ``--workers``.
``--course`` also grades one correct submission of every course notebook in fast mode, checks on and off,
and states the 300-student whole-course estimate for one 16-core machine: sum of the per-notebook task
seconds (one task per core, tasks independent) x 300 / 16.

Reported per run: submissions, wall-clock seconds, seconds per submission (wall / submissions) and the
speedup (wall with 1 worker / wall with N). The infinite-loop cases wait for the cell time limit, so they
weigh on the 1-worker run the most.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from grading_cli import driver
from grading_cli.course import Course

ROOT = Path(__file__).resolve().parents[1]


def _cohort_script(name: str):
    """Import ``tests/cohort/<name>.py`` by path (the cohort builders are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"cohort_{name}", ROOT / "tests" / "cohort" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build_course = _cohort_script("fixtures").build_course
make_cohort = _cohort_script("make_cohort").make_cohort

OPTIONS = {"limits": {"cell_timeout": 20, "notebook_timeout": 120, "interrupt_grace": 5}, "isolation": "auto",
           "unsafe": True,  # measure on whatever sandbox this machine has (reported in the 'sandbox' column)
           "params": {"fast": True, "device": "cpu", "out_dir": "artifacts"}}


def measure(workers: int | None = None, cases=None, copies: int = 1) -> list[dict]:
    """One row per run (1 worker, then ``workers``, then ``workers`` with the checks off): wall seconds,
    seconds per submission, speedup."""
    workers = workers or os.cpu_count() or 1
    rows, csvs = [], []
    with tempfile.TemporaryDirectory(prefix="bench-grading-") as tmp:
        tmp = Path(tmp)
        grading = build_course(tmp / "course")
        make_cohort(tmp / "one", grading, cases=cases)
        cohort = tmp / "cohort"
        for k in range(copies):
            for student in (p for p in (tmp / "one").iterdir() if p.is_dir()):
                shutil.copytree(student, cohort / f"{student.name}_{k}")
        for n, checks in [(n, True) for n in sorted({1, workers})] + [(workers, False)]:
            shutil.copytree(tmp / "course", tmp / f"course-{n}-{checks}")
            course = Course.load(tmp / f"course-{n}-{checks}" / "grading")
            summary = driver.grade(course, cohort, workers=n, options=dict(OPTIONS, checks=checks),
                                   log=lambda *a: None)
            if checks:
                csvs.append((course.root / "grades.csv").read_text())
            rows.append({"workers": summary["workers"], "submissions": summary["submissions"], "checks": checks,
                         "wall_s": summary["wall_seconds"], "s_per_submission": summary["seconds_per_submission"],
                         "task_s": round(summary["task_seconds"] / summary["submissions"], 2),
                         "sandbox": ",".join(summary["isolation"])})
    for row in rows:
        row["speedup"] = round(rows[0]["wall_s"] / row["wall_s"], 2)
        row["same_grades"] = all(c == csvs[0] for c in csvs)
    return rows


def measure_course(workers: int | None = None) -> list[dict]:
    """One correct submission of every course notebook (fast mode), graded with the checks on, then off:
    per-notebook task seconds (what one core spends on it)."""
    workers = workers or os.cpu_count() or 1
    names = sorted(p.parent.name for p in (ROOT / "solutions").glob("[0-9]*/*.ipynb") if p.parent.name == p.stem)
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-grading-course-") as tmp:
        tmp = Path(tmp)
        (tmp / "course" / "grading").mkdir(parents=True)
        shutil.copy(ROOT / "grading" / "nbgrader_config.py", tmp / "course" / "grading")
        for a in names:
            shutil.copytree(ROOT / "solutions" / a, tmp / "course" / "solutions" / a,
                            ignore=shutil.ignore_patterns("artifacts", "*.pt", "*.png", ".ipynb_checkpoints"))
        course = Course.load(tmp / "course" / "grading")
        course.release_all(names)
        make_cohort(tmp / "cohort", course.root, names, ["correct"])
        for checks in (True, False):
            options = dict(OPTIONS, checks=checks, limits={"cell_timeout": 600, "notebook_timeout": 1200})
            summary = driver.grade(course, tmp / "cohort", workers=workers, options=options, log=lambda *a: None)
            per = {r["assignment"]: r["seconds"] for r in summary["results"]}
            out.append({"checks": checks, "per_notebook": per, "course_task_s": round(sum(per.values()), 1),
                        "wall_s": summary["wall_seconds"], "sandbox": ",".join(summary["isolation"])})
    return out


def class_estimate(course_task_s: float, students: int = 300, cores: int = 16) -> float:
    """Minutes for ``students`` x the whole course on ``cores`` single-threaded workers (tasks independent)."""
    return round(course_task_s * students / cores / 60, 1)


def run(device: str = "cpu", course: bool = True) -> list[dict]:
    """Rows in bench/run_all.py's format (bench, figure, value, target, ok, detail)."""
    rows = measure()
    cores = os.cpu_count() or 1
    out = [dict(bench="grading", figure=f"seconds per submission, {r['workers']} worker(s)"
                + ("" if r["checks"] else ", checks off (hidden tests in the kernel, before issue 14)"),
                value=r["s_per_submission"], target="reported", ok=True,
                detail=f"{r['submissions']} submissions in {r['wall_s']} s, {r['task_s']} s per task, "
                       f"sandbox {r['sandbox']}") for r in rows]
    on, off = rows[-2], rows[-1]
    out.append(dict(bench="grading", figure="task seconds per submission, checks on / off", value=round(
        on["task_s"] / off["task_s"], 2), target="reported", ok=True,
        detail=f"{on['task_s']} s vs {off['task_s']} s per task on {on['workers']} workers (fixture cohort)"))
    if course:
        on_c, off_c = measure_course()
        minutes = class_estimate(on_c["course_task_s"])
        out.append(dict(bench="grading", figure="whole course, one student: task seconds, checks on / off",
                        value=f"{on_c['course_task_s']} / {off_c['course_task_s']}", target="reported", ok=True,
                        detail="per notebook (on): " + ", ".join(f"{a[:2]} {s:.1f}s" for a, s in
                                                                 sorted(on_c["per_notebook"].items()))))
        out.append(dict(bench="grading", figure="300 students x whole course on one 16-core machine, minutes",
                        value=minutes, target="< 60", ok=minutes < 60,
                        detail=f"{on_c['course_task_s']} task-seconds per student x 300 / 16 workers (estimate "
                               f"from this machine's per-core rate; {class_estimate(off_c['course_task_s'])} "
                               "min with the checks off)"))
    last = [r for r in rows if r["checks"]][-1]
    out.append(dict(bench="grading", figure=f"speedup, {last['workers']} workers vs 1", value=last["speedup"],
                    target="> 1.3" if cores > 1 else "reported", ok=cores == 1 or last["speedup"] > 1.3,
                    detail=f"{cores} cores"))
    out.append(dict(bench="grading", figure="same grades.csv with 1 and N workers", value=last["same_grades"],
                    target=True, ok=last["same_grades"], detail=""))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, help="Dask workers for the parallel run (default: all cores)")
    p.add_argument("--cases", nargs="*", help="cohort cases to grade (default: all)")
    p.add_argument("--copies", type=int, default=1, help="repeat the cohort under other names")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--course", action="store_true", help="also grade every course notebook (the class estimate)")
    args = p.parse_args(argv)
    if args.course:
        for r in measure_course(args.workers):
            print(f"checks={r['checks']} course task seconds={r['course_task_s']} "
                  f"(300 x 16 cores: {class_estimate(r['course_task_s'])} min) wall={r['wall_s']} "
                  f"sandbox={r['sandbox']} per notebook={r['per_notebook']}")
    rows = measure(args.workers, args.cases, args.copies)
    cols = ["workers", "checks", "submissions", "wall_s", "s_per_submission", "task_s", "speedup", "same_grades",
            "sandbox"]
    if args.markdown:
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    else:
        for r in rows:
            print("  ".join(f"{c}={r[c]}" for c in cols))
    return 0 if all(r["same_grades"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
