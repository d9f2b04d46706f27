"""report.md: what the grader did to each submission (repairs), what it found (flags), why cells scored 0.

Everything that comes from a submission (file names, exception messages, flag details) is escaped
(``sanitize.md_escape``): it cannot add headings, tables, links or HTML to the report."""
from __future__ import annotations

import csv
from datetime import datetime, timezone

from .course import Course
from .flags import FLAGS, REPAIRS
from .results import load_results
from .sanitize import md_escape


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
        lines += ["## Files not graded", ""] + [f"- {md_escape(p)}" for p in summary["problems"]] + [""]
    lines += ["## Submissions", "", "| student | assignment | score | max | flags | repairs |", "|" + "---|" * 6]
    lines += ["| " + " | ".join(md_escape(r[k]) for k in ("student", "assignment", "score", "max_score", "flags",
                                                          "repairs")) + " |" for r in rows]
    lines += ["", "## Details", ""]
    for (s, a), r in sorted(results.items()):
        notes = [f"`{x['code']}`: {md_escape(x['detail'], 2000)}" for nb in r["notebooks"]
                 for x in nb["repairs"] + nb["flags"]]
        zeros = [f"{md_escape(c['grade_id'])} = 0 ({md_escape(c['reason'])})" for nb in r["notebooks"]
                 for c in nb.get("cells", []) if c["score"] == 0]
        if r.get("error"):
            notes.append("grader error: " + md_escape(r["error"].strip().splitlines()[-1]))
        if notes or zeros:
            lines.append(f"- **{md_escape(s)} / {md_escape(a)}** ({md_escape(r.get('origin', ''))}): "
                         + "; ".join(notes + zeros))
    lines += ["", "## What the codes mean", ""]
    lines += [f"- `{k}`: {v}" for k, v in {**FLAGS, **REPAIRS}.items()]
    path = course.root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
