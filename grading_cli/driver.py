"""The driver: fan the tasks out on Dask, then, as the only writer, fill the gradebook and write the results.

Layout under the course root (nbgrader's, plus two files):
``submitted/<student>/<assignment>/`` the files as received; ``autograded/<student>/<assignment>/`` the
repaired, executed notebook (instructors only: it holds hidden tests) and ``grading_result.json``;
``feedback/<student>/<assignment>/<notebook>.html``; ``grades.csv`` and ``report.md``.
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import shutil
import time
import warnings
from pathlib import Path

from .collect import collect, safe_id
from .course import Course, assignment_spec
from .execute import probe_isolation
from .flags import TAMPER
from .report import write_report
from .results import load_results
from .task import grade_one

COLUMNS = ["student", "assignment", "status", "score", "max_score", "auto_score", "auto_max", "manual_pending",
           "flags", "repairs", "cells"]


def check_level(isolation: str, unsafe: bool) -> str:
    """The sandbox level this machine gives; below ``full`` only with ``unsafe`` (learner code is hostile)."""
    level = probe_isolation(isolation)
    if level != "full" and not unsafe:
        raise ValueError(f"the sandbox here is {level!r}, not 'full' (root on Linux): learner code could "
                         f"{'read the files you can read' if level == 'net' else 'read and write what you can'}. "
                         "Grade as root (a VM or container) or pass --unsafe (see docs/grading.md, Security model)")
    return level


def make_client(scheduler: str | None = None, workers: int | None = None):
    """A Dask client on ``scheduler`` (tcp://host:port), else on a LocalCluster with one process per core."""
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler, timeout="30s"), None
    n = workers or os.cpu_count() or 1
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                           memory_limit=0, silence_logs=40)
    return Client(cluster), cluster


def _check_workers(client) -> None:
    def probe():
        import grading_cli.task  # noqa: F401

        return True

    try:
        client.run(probe)
    except Exception as err:
        raise RuntimeError("Dask workers cannot import grading_cli: install the course in their environment "
                           f"(pip install -e '<repo>[grading]', i.e. make setup) ({err})") from err


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)


def store(course: Course, result: dict, files: dict[str, bytes]) -> None:
    """Write one result: submitted/, autograded/, feedback/ and the gradebook (called by the driver only)."""
    s, a = result["student"], result["assignment"]
    for area in ("submitted", "autograded", "feedback"):
        shutil.rmtree(course.root / area / s / a, ignore_errors=True)
    for name, data in files.items():
        _write(course.root / "submitted" / s / a / name, data)
    for nb in result["notebooks"]:
        if nb.get("autograded"):
            _write(course.root / "autograded" / s / a / f"{nb['name']}.ipynb", nb.pop("autograded"))
        if nb.get("feedback_html"):
            _write(course.root / "feedback" / s / a / f"{nb['name']}.html", nb.pop("feedback_html"))
    _write(course.root / "autograded" / s / a / "grading_result.json", json.dumps(result, indent=1, sort_keys=True))
    if result["status"] != "graded":
        return
    with course.gradebook() as gb, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SQLAlchemy 2.1 warns inside nbgrader's add_submission; harmless
        gb.update_or_create_student(s)
        gb.update_or_create_submission(a, s)
        for nb in result["notebooks"]:
            if nb["status"] != "graded" and not nb["cells"]:
                continue
            sub_nb = gb.find_submission_notebook(nb["name"], a, s)
            sub_nb.flagged = any(f["code"] in TAMPER for f in nb["flags"])
            for cell in nb["cells"]:
                grade = gb.find_grade(cell["grade_id"], nb["name"], a, s)
                if cell["kind"] == "test":
                    grade.auto_score, grade.needs_manual_grade = cell["score"], False
                else:  # keep a score an instructor already gave by hand
                    grade.auto_score, grade.needs_manual_grade = None, grade.manual_score is None
        gb.db.commit()


def read_roster(path) -> list[str]:
    """Student ids from a CSV with an ``id``/``student_id``/``student`` column, or one id per line."""
    text = Path(path).read_text()
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    for key in ("student_id", "id", "student"):
        if key in header:
            k = header.index(key)
            return [safe_id(r[k]) for r in rows[1:] if len(r) > k and r[k].strip()]
    return [safe_id(r[0]) for r in rows if r and r[0].strip()]


def export(course: Course, roster: list[str] | None = None) -> Path:
    """grades.csv: one row per roster student and graded assignment, from the gradebook and stored results."""
    results = load_results(course)
    with course.gradebook() as gb:
        students = sorted(set(roster or []) | {st.id for st in gb.students} | {s for s, _ in results})
        assignments = sorted({a for _, a in results})
        maxima = {a: float(gb.find_assignment(a).max_score) for a in assignments}
        rows = []
        for s in students:
            for a in assignments:
                r = results.get((s, a))
                row = dict.fromkeys(COLUMNS, "")
                row.update(student=s, assignment=a, max_score=f"{maxima[a]:g}", status="missing", score="0",
                           flags="missing")
                if r is None:
                    rows.append(row)
                    continue
                cells = [c for nb in r["notebooks"] for c in nb.get("cells", [])]
                flags = {f["code"] for nb in r["notebooks"] for f in nb["flags"]}
                auto = sum(c["score"] or 0 for c in cells)
                score, pending = auto, 0
                if r["status"] == "graded":
                    sub = gb.find_submission(a, s)
                    score = sub.score
                    pending = sum(g.max_score for nb in sub.notebooks for g in nb.grades if g.needs_manual_grade)
                if r["status"] == "error":
                    flags.add("grader_error")
                if pending:
                    flags.add("needs_manual_grade")
                marks = {c["grade_id"]: ("-" if c["score"] is None else f"{c['score']:g}") for c in cells}
                if r["status"] == "graded":
                    for nb in sub.notebooks:
                        for g in nb.grades:
                            if g.manual_score is not None:
                                marks[g.name] = f"{g.score:g}"
                row.update(status=r["status"], score=f"{score:g}", auto_score=f"{auto:g}",
                           auto_max=f"{sum(c['points'] for c in cells if c['kind'] == 'test'):g}",
                           manual_pending=f"{pending:g}", flags=";".join(sorted(flags)),
                           repairs=";".join(sorted({x["code"] for nb in r["notebooks"] for x in nb["repairs"]})),
                           cells=" ".join(f"{c['grade_id']}={marks[c['grade_id']]}/{c['points']:g}" for c in cells))
                rows.append(row)
    path = course.root / "grades.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return path


def grade(course: Course, submissions, *, assignments=None, roster=None, workers=None, scheduler=None,
          options: dict | None = None, log=print) -> dict:
    """Collect -> (Dask) repair, execute, score -> gradebook, feedback, grades.csv, report. Returns a summary."""
    t0 = time.monotonic()
    lock = open(course.root / ".grading.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        lock.close()
        raise RuntimeError(f"another grading run is writing {course.root} (the gradebook has one writer)") from err
    try:
        return _grade(course, submissions, t0, assignments, roster, workers, scheduler, options, log)
    finally:
        lock.close()


def _grade(course, submissions, t0, assignments, roster, workers, scheduler, options, log) -> dict:
    names = list(assignments or course.released_assignments())
    specs = {a: assignment_spec(course, a) for a in names}
    subs, problems = collect(submissions, specs)
    for p in problems:
        log(f"warning: {p}")
    if not subs:
        raise ValueError(f"no submissions for {', '.join(names)} found in {submissions}")
    options = dict(options or {})
    check_level(options.get("isolation", "auto"), options.get("unsafe", False))
    client, cluster = make_client(scheduler, workers)
    summary = {"submissions": len(subs), "problems": problems, "results": [], "workers": 0}
    try:
        _check_workers(client)
        summary["workers"] = len(client.scheduler_info(n_workers=-1)["workers"])
        from distributed import as_completed

        spec_refs = {a: client.scatter([spec], broadcast=True, hash=False)[0] for a, spec in specs.items()}
        futures = {client.submit(grade_one, spec_refs[s.assignment], s.as_task(), options, pure=False,
                                 key=f"grade-{s.student}-{s.assignment}-{time.time_ns()}"): s for s in subs}
        done = 0
        for fut in as_completed(futures):
            sub = futures[fut]
            try:
                result = fut.result()
            except Exception as err:  # noqa: BLE001 - e.g. a worker that died: report it, go on
                result = {"student": sub.student, "assignment": sub.assignment, "status": "error",
                          "notebooks": [], "error": f"{type(err).__name__}: {err}", "seconds": 0.0}
            store(course, result, sub.files)
            done += 1
            scores = [c for nb in result["notebooks"] for c in nb.get("cells", [])]
            auto = sum(c["score"] or 0 for c in scores)
            flags = sorted({f["code"] for nb in result["notebooks"] for f in nb["flags"]})
            log(f"[{done}/{len(subs)}] {sub.student} {sub.assignment}: {result['status']} {auto:g} "
                f"{' '.join(flags)} ({result.get('seconds', 0):.1f} s)")
            summary["results"].append({k: result.get(k) for k in ("student", "assignment", "status", "seconds",
                                                                  "isolation")})
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    wall = time.monotonic() - t0
    busy = sum(r["seconds"] or 0 for r in summary["results"])
    summary.update(wall_seconds=round(wall, 1), task_seconds=round(busy, 1),
                   seconds_per_submission=round(wall / len(subs), 2), concurrency=round(busy / wall, 2) if wall else 0,
                   isolation=sorted({str(r["isolation"]) for r in summary["results"]}))
    summary["csv"] = str(export(course, roster))
    summary["report"] = str(write_report(course, summary, roster))
    return summary
