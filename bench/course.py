"""Course benchmark: seconds per notebook of the fast papermill run, and seconds per autograded submission.

1. ``tools/run_course.py`` (what ``make course`` runs: every solution notebook, fast mode, in sequence)
   into a temporary runs folder; its ``summary.csv`` gives each notebook's status and seconds. Target:
   the whole course in fast mode in < 300 s on 2 CPU cores. A notebook that fails misses its row.
2. When ``grading_cli`` exists: a copy of the course in a temporary folder (the repository's gradebook
   is never touched), ``python -m grading_cli release``, a cohort of correct submissions from
   ``tests/cohort/make_cohort.py`` (one per assignment), ``python -m grading_cli grade --json``. The
   figure is the grader's own ``seconds_per_submission`` (wall seconds / submissions, sandboxed kernels,
   2 workers). Without ``grading_cli`` the row says "skipped".
3. The same notebooks as a learner's JupyterLab kernel runs them (``_learner_env``: no OMP_NUM_THREADS, no
   pinned kernels, progress bars on; course_lib.setup_threads picks the thread count). Target: within 1.2x
   of the ``make course`` total.

The benchmark works with whatever notebooks exist. ``python -m bench.course [--no-grade] [--only 00 03]``;
``run()`` returns the rows for bench/run_all.py.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_TARGET_S = 300.0
_WALL: dict = {}  # wall seconds of the last make-course run, papermill start-up included (the learner figure's peer)
RUN_TIMEOUT_S, GRADE_TIMEOUT_S = 3600, 3600


def _row(figure, value, target, ok, detail):
    return dict(bench="course", figure=figure, value=value, target=target, ok=bool(ok), detail=detail)


def _env() -> dict:
    env = dict(os.environ, COURSE_FAST="1", MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # nbgrader needs alembic
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT)
    return env


def _tail(text: str, n: int = 300) -> str:
    return " ".join(text.strip().split())[-n:]


def _load() -> str:
    try:
        return f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    except OSError:
        return f"{os.cpu_count()} cores"


def _children_cpu() -> float:
    """CPU seconds (user + system) of finished child processes: papermill and its kernels. Unlike wall
    time it hardly depends on what else the machine runs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench_notebooks(only=()) -> list[dict]:
    """Run the course in fast mode into a temporary runs folder; one row per notebook plus the total."""
    with tempfile.TemporaryDirectory(prefix="bench-course-") as tmp:
        cmd = [sys.executable, str(ROOT / "tools" / "run_course.py"), "--runs-dir", tmp]
        cmd += ["--only", *only] if only else []
        t0, cpu0 = time.perf_counter(), _children_cpu()
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
        _WALL["make course"] = wall
        summary = Path(tmp) / "latest" / "summary.csv"
        if not summary.exists():
            if "No notebooks found" in proc.stdout:
                return [_row("course fast: notebooks", 0, "reported", True, "no notebooks yet: nothing to run")]
            why = f"run_course.py exited {proc.returncode} without a summary: {_tail(proc.stdout + proc.stderr)}"
            return [_row("course fast: total seconds", None, f"< {TOTAL_TARGET_S:.0f}", False, why)]
        with open(summary, newline="") as f:
            records = list(csv.DictReader(f))
    rows = []
    for r in records:
        ok = r["status"] == "ok"
        detail = "ok" if ok else f"FAILED {r['cell']}: {r['error'][:200]}"
        rows.append(_row(f"course fast: {r['notebook']} seconds", float(r["seconds"]), "reported (runs ok)", ok,
                         detail))
    total = sum(float(r["seconds"]) for r in records)
    failed = [r["notebook"] for r in records if r["status"] != "ok"]
    rows.append(_row("course fast: total seconds", round(total, 1), f"< {TOTAL_TARGET_S:.0f}", total < TOTAL_TARGET_S,
                     f"{len(records)} notebooks, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; "
                     f"{wall:.0f} s wall with papermill start-up, {cpu:.0f} CPU-seconds (all processes); {_load()}"))
    return rows


def _run(cmd, timeout) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(Path(c).name if '/' in c else c for c in cmd[:4])} exited "
                           f"{proc.returncode}: {_tail(proc.stdout + proc.stderr)}")
    return proc


def bench_grading(workers: int = 2) -> list[dict]:
    """Autograde one correct submission per assignment in a throw-away copy of the course."""
    figure = "autograde: seconds per submission"
    if importlib.util.find_spec("grading_cli") is None and not (ROOT / "grading_cli" / "__main__.py").exists():
        return [_row(figure, None, "skipped", True, "grading_cli does not exist yet")]
    if not (ROOT / "tests" / "cohort" / "make_cohort.py").exists():
        return [_row(figure, None, "skipped", True, "tests/cohort/make_cohort.py (the submission maker) is missing")]
    with tempfile.TemporaryDirectory(prefix="bench-grade-") as tmp:
        tmp = Path(tmp)
        (tmp / "grading").mkdir()
        # the config names ../solutions (source) and ../notebooks (release): the same layout in tmp
        shutil.copy(ROOT / "grading" / "nbgrader_config.py", tmp / "grading")
        skip = shutil.ignore_patterns("artifacts", ".ipynb_checkpoints", "__pycache__", "*.pt", "*.png")
        shutil.copytree(ROOT / "solutions", tmp / "solutions", ignore=skip)
        course = ["--course-root", str(tmp / "grading")]
        try:
            t0 = time.perf_counter()
            _run([sys.executable, "-m", "grading_cli", *course, "release"], GRADE_TIMEOUT_S)
            release_s = time.perf_counter() - t0
            _run([sys.executable, str(ROOT / "tests" / "cohort" / "make_cohort.py"), str(tmp / "cohort"),
                  "--course-root", str(tmp / "grading"), "--cases", "correct"], GRADE_TIMEOUT_S)
            proc = _run([sys.executable, "-m", "grading_cli", *course, "grade", str(tmp / "cohort"), "--json",
                         "--no-feedback", "--workers", str(workers)], GRADE_TIMEOUT_S)
            out = proc.stdout
            summary, _ = json.JSONDecoder().raw_decode(out[out.index("{\n"):])
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as err:
            return [_row(figure, None, "reported", False, f"grading failed: {_tail(str(err), 400)}")]
    results = summary.get("results", [])
    graded = [r for r in results if r.get("status") == "graded"]
    per = ", ".join(f"{r['assignment']} {r['seconds']:.1f}s" for r in results)
    return [_row(figure, summary["seconds_per_submission"], "reported", len(graded) == len(results) > 0,
                 f"{summary['submissions']} submissions, {summary['wall_seconds']} s wall on {summary['workers']} "
                 f"workers, sandbox {'/'.join(summary.get('isolation', []))}; per task: {per}; "
                 f"release took {release_s:.0f} s; {_load()}")]


def _learner_env() -> dict:
    """A learner's JupyterLab kernel in fast mode: none of the regression kernel's settings (no thread count,
    no pinned CPU kernels, progress bars on), so course_lib chooses the thread count itself (setup_threads)."""
    from course_lib.runtime import KERNEL_ENV

    env = {k: v for k, v in _env().items() if k not in KERNEL_ENV and k != "COURSE_THREADS"}
    return dict(env, COURSE_FAST="1")


def bench_learner_kernel(only=(), course_total: float | None = None) -> list[dict]:
    """The course figure as a learner gets it: every solution notebook, fast mode, papermill, learner kernel env.

    Target: within 1.2x of ``course_total``, the wall seconds of the ``make course`` run (regression kernel),
    both with papermill's start-up per notebook."""
    figure = "course fast, learner kernel: total seconds"
    notebooks = sorted(p for p in (ROOT / "solutions").glob("[0-9]*/*.ipynb") if p.parent.name == p.stem
                       and (not only or p.stem.startswith(tuple(only))))
    total, failed = 0.0, []
    with tempfile.TemporaryDirectory(prefix="bench-learner-") as tmp:
        for nb in notebooks:
            work = Path(tmp) / nb.stem
            shutil.copytree(nb.parent, work, ignore=shutil.ignore_patterns("artifacts", "*.pt", "*.png"))
            cmd = [sys.executable, "-m", "papermill", "--log-level", "ERROR", "-k", "python3", str(work / nb.name),
                   str(work / "out.ipynb"), "-p", "fast", "True", "-p", "out_dir", str(work / "artifacts")]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=work, env=_learner_env(), capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT_S)
            total += time.perf_counter() - t0
            if proc.returncode != 0:
                failed.append(f"{nb.stem}: {_tail(proc.stderr, 150)}")
    target = f"<= 1.2 x make course ({course_total:.0f} s)" if course_total else "reported"
    ok = not failed and (course_total is None or total <= 1.2 * course_total)
    ratio = f", {total / course_total:.2f} x make course" if course_total else ""
    return [_row(figure, round(total, 1), target, ok,
                 f"{len(notebooks)} notebooks with papermill start-up{ratio}; {len(failed)} failed"
                 f"{': ' + '; '.join(failed) if failed else ''}; {_load()}")]


def run(grade: bool = True, only=()) -> list[dict]:
    """Rows (bench, figure, value, target, ok, detail): notebooks, total, the learner kernel, then autograding."""
    rows = bench_notebooks(only)
    course_total = _WALL.get("make course")
    rows += bench_learner_kernel(only, course_total)
    return rows + (bench_grading() if grade else [_row("autograde: seconds per submission", None,
                                                       "skipped", True, "--no-grade")])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-grade", action="store_true", help="skip the autograding figure")
    p.add_argument("--only", nargs="*", default=(), help="notebook prefixes, e.g. 00 03")
    args = p.parse_args(argv)
    rows = run(not args.no_grade, tuple(args.only))
    for r in rows:
        print(f"{r['figure']}: {r['value']} (target {r['target']}) {'OK' if r['ok'] else 'MISSED'}  [{r['detail']}]")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
