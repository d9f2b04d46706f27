"""Grading benchmark: seconds per submission and the speedup of Dask fan-out over one worker.

Run ``python bench/grading.py`` (add ``--markdown`` for a markdown table). It builds the fixture course and
cohort of ``tests/cohort`` (two small assignments, every case of the cohort) in a temporary folder, grades it
with 1 worker, then with ``--workers`` (default: all cores), and checks that both give the same grades.csv.
``--cases correct blank ...`` grades a subset; ``--copies N`` repeats the cohort N times under other student
names (a bigger class). ``run()`` returns figure rows for ``bench/run_all.py`` (add ``"grading"`` to its BENCHES).

Reported per run: submissions, wall-clock seconds, seconds per submission (wall / submissions) and the
speedup (wall with 1 worker / wall with N). The infinite-loop cases wait for the cell time limit, so they
weigh on the 1-worker run the most.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cohort"))  # the cohort builders are scripts, not a package

from fixtures import build_course  # noqa: E402
from make_cohort import make_cohort  # noqa: E402

from grading_cli import driver  # noqa: E402
from grading_cli.course import Course  # noqa: E402

OPTIONS = {"limits": {"cell_timeout": 20, "notebook_timeout": 120, "interrupt_grace": 5}, "isolation": "auto",
           "unsafe": True,  # measure on whatever sandbox this machine has (reported in the 'sandbox' column)
           "params": {"fast": True, "device": "cpu", "out_dir": "artifacts"}}


def measure(workers: int | None = None, cases=None, copies: int = 1) -> list[dict]:
    """One row per run (1 worker, then ``workers``): wall seconds, seconds per submission, speedup."""
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
        for n in sorted({1, workers}):
            shutil.copytree(tmp / "course", tmp / f"course-{n}")
            course = Course.load(tmp / f"course-{n}" / "grading")
            summary = driver.grade(course, cohort, workers=n, options=OPTIONS, log=lambda *a: None)
            csvs.append((course.root / "grades.csv").read_text())
            rows.append({"workers": summary["workers"], "submissions": summary["submissions"],
                         "wall_s": summary["wall_seconds"], "s_per_submission": summary["seconds_per_submission"],
                         "sandbox": ",".join(summary["isolation"])})
    for row in rows:
        row["speedup"] = round(rows[0]["wall_s"] / row["wall_s"], 2)
        row["same_grades"] = all(c == csvs[0] for c in csvs)
    return rows


def run(device: str = "cpu") -> list[dict]:
    """Rows in bench/run_all.py's format (bench, figure, value, target, ok, detail)."""
    rows = measure()
    cores = os.cpu_count() or 1
    out = [dict(bench="grading", figure=f"seconds per submission, {r['workers']} worker(s)",
                value=r["s_per_submission"], target="reported", ok=True,
                detail=f"{r['submissions']} submissions in {r['wall_s']} s, sandbox {r['sandbox']}") for r in rows]
    last = rows[-1]
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
    args = p.parse_args(argv)
    rows = measure(args.workers, args.cases, args.copies)
    cols = ["workers", "submissions", "wall_s", "s_per_submission", "speedup", "same_grades", "sandbox"]
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
