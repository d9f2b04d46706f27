"""report.md: what the grader did to each submission (repairs), what it found (flags), why cells scored 0."""
from __future__ import annotations

import csv
from datetime import datetime, timezone

from .course import Course
from .driver import load_results

FLAG_HELP = {
    "missing": "no submission from this roster student",
    "unreadable": "the file is not a readable notebook: 0 for what could not be graded",
    "no_notebook": "the submission holds no notebook matching the released one",
    "edited_tests": "a test cell was edited (the released test was restored and used)",
    "edited_locked": "a read-only cell was edited (restored)",
    "deleted_cells": "a test or read-only cell was deleted (restored and graded)",
    "changed_points": "the points in the cell metadata were changed (the gradebook's points are used)",
    "changed_metadata": "nbgrader metadata (grade/solution/locked) was changed (restored)",
    "answer_missing": "an answer cell could not be found: graded as blank",
    "suspicious_code": "the learner's code reaches into the kernel or redefines comparisons: review by hand",
    "cell_timeout": "a cell hit the per-cell time limit and was interrupted",
    "notebook_timeout": "the whole-notebook time limit was reached: later cells did not run",
    "kernel_killed": "the kernel ignored the interrupt and was killed: later cells did not run",
    "kernel_died": "the kernel died (os._exit, a crash, or the memory/CPU limit): later cells did not run",
    "kernel_failed": "the kernel did not start (grader problem: see the result file)",
    "output_truncated": "outputs were cut to the per-cell limit",
    "isolation_degraded": "the sandbox was weaker than 'full' on the worker (see the security model)",
    "needs_manual_grade": "points wait for a human grade (formgrader)",
    "grader_error": "the grader failed on this submission (see report); it did not stop the batch",
}
REPAIR_HELP = {
    "renamed": "the notebook was renamed (e.g. -Copy1, 'Copy of'): matched by name and content",
    "extra_notebooks": "other copies of the notebook were ignored",
    "metadata_restored": "nbgrader cell metadata was missing (Colab...): cells matched by position and content",
    "duplicate_cells": "copied cells (repeated grade ids or copies of graded cells): one kept",
    "reordered": "cells were moved: graded in the released order",
    "restored_cells": "a deleted plain code cell was put back from the release",
}


def write_report(course: Course, summary: dict, roster=None):
    results = load_results(course)
    with open(course.root / "grades.csv") as f:
        rows = list(csv.DictReader(f))
    lines = [f"# Grading report ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
             f"- this run: {summary['submissions']} submissions on {summary['workers']} Dask workers in "
             f"{summary['wall_seconds']} s ({summary['seconds_per_submission']} s per submission wall-clock, "
             f"{summary['task_seconds']} s of task time, concurrency {summary['concurrency']})",
             f"- sandbox level on the workers: {', '.join(summary['isolation'])}",
             f"- grades: `{course.root / 'grades.csv'}` ({len(rows)} rows)", ""]
    if summary["problems"]:
        lines += ["## Files not graded", ""] + [f"- {p}" for p in summary["problems"]] + [""]
    lines += ["## Submissions", "", "| student | assignment | score | max | flags | repairs |", "|" + "---|" * 6]
    lines += [f"| {r['student']} | {r['assignment']} | {r['score']} | {r['max_score']} | {r['flags']} | "
              f"{r['repairs']} |" for r in rows]
    lines += ["", "## Details", ""]
    for (s, a), r in sorted(results.items()):
        notes = [f"{x['code']}: {x['detail']}" for nb in r["notebooks"] for x in nb["repairs"] + nb["flags"]]
        zeros = [f"{c['grade_id']} = 0 ({c['reason']})" for nb in r["notebooks"] for c in nb.get("cells", [])
                 if c["score"] == 0]
        if r.get("error"):
            notes.append("grader error: " + r["error"].strip().splitlines()[-1])
        if notes or zeros:
            lines.append(f"- **{s} / {a}** ({r.get('origin', '')}): " + "; ".join(notes + zeros))
    lines += ["", "## What the codes mean", ""]
    lines += [f"- `{k}`: {v}" for k, v in {**FLAG_HELP, **REPAIR_HELP}.items()]
    path = course.root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
