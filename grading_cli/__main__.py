"""python -m grading_cli {release,grade,export,check}: the instructor's cycle, one command per step."""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

from .course import REPO, Course
from .execute import Limits, probe_isolation


def check_test_cells(course: Course) -> list[str]:
    """Problems in the source notebooks' test cells that would make scores wrong."""
    import nbformat

    problems = []
    for path in sorted(course.source.glob("*/*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            meta = cell.metadata.get("nbgrader", {})
            if not (meta.get("grade") and not meta.get("solution")) or cell.cell_type != "code":
                continue
            code = "\n".join(ln for ln in cell.source.split("\n") if not ln.lstrip().startswith(("%", "!")))
            try:
                body = ast.parse(code).body
            except SyntaxError as err:
                problems.append(f"{path.name}:{meta['grade_id']}: does not parse ({err.msg})")
                continue
            if body and isinstance(body[-1], ast.Expr) and not isinstance(body[-1].value, ast.Call):
                problems.append(f"{path.name}:{meta['grade_id']}: ends in a bare expression (nbgrader would read "
                                "a number there as partial credit)")
            if "### BEGIN HIDDEN TESTS" in cell.source and "### END HIDDEN TESTS" not in cell.source:
                problems.append(f"{path.name}:{meta['grade_id']}: BEGIN HIDDEN TESTS without END")
            for name in _bare_comparisons(body):
                if not re.search(rf"type\(\s*{name}\s*\)\s+is\b", cell.source):
                    problems.append(f"{path.name}:{meta['grade_id']}: compares {name} with == but never checks "
                                    f"`type({name}) is ...` (an object whose __eq__ is always True passes)")
    return problems


def hidden_test_cells(course: Course) -> int:
    import nbformat

    return sum("### BEGIN HIDDEN TESTS" in c.source for p in sorted(course.source.glob("*/*.ipynb"))
               for c in nbformat.read(p, as_version=4).cells
               if c.metadata.get("nbgrader", {}).get("grade") and not c.metadata.get("nbgrader", {}).get("solution"))


def in_kernel_tests(course: Course) -> list[str]:
    """Test cells whose hidden part still runs in the learner's kernel (no grader-side check, or one the
    release had to skip): protected by the tamper scanner only (see docs/grading.md)."""
    import nbformat

    from .checks import registry

    checks, out = registry(course.root), []
    for path in sorted(course.source.glob("*/*.ipynb")):
        stored = course.root / "expected" / f"{path.parent.name}.json"
        skipped = {t for t, e in (json.loads(stored.read_text()) if stored.is_file() else {}).items() if "skipped" in e}
        mine = checks.get(path.parent.name, {})
        for cell in nbformat.read(path, as_version=4).cells:
            meta = cell.metadata.get("nbgrader", {})
            gid = meta.get("grade_id")
            if meta.get("grade") and not meta.get("solution") and "### BEGIN HIDDEN TESTS" in cell.source and \
                    (gid not in mine or gid in skipped):
                out.append(f"{path.parent.name}:{gid}")
    return out


def _bare_comparisons(body) -> set[str]:
    """Names compared with == / in against a literal in asserts (what a gaming __eq__ fools)."""
    names = set()
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if isinstance(node, ast.Assert):
            for cmp in ast.walk(node.test):
                if isinstance(cmp, ast.Compare) and isinstance(cmp.left, ast.Name) and \
                        any(isinstance(op, ast.Eq) for op in cmp.ops) and \
                        any(isinstance(c, ast.Constant) and isinstance(c.value, str) for c in cmp.comparators):
                    names.add(cmp.left.id)
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m grading_cli", description=__doc__)
    p.add_argument("--course-root", default=str(REPO / "grading"), help="nbgrader course root (default: grading/)")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("release", help="nbgrader generate_assignment for every (or the named) assignment, then "
                                       "the expected values of the grader-side checks from the solutions")
    r.add_argument("assignments", nargs="*")
    g = sub.add_parser("grade", help="collect -> repair -> execute in a sandbox -> score -> gradebook, feedback, CSV")
    g.add_argument("submissions",
                   help="folder (<student>/<assignment>/<nb>.ipynb, or flat <student>_<nb>.ipynb files) or a .zip")
    g.add_argument("--assignment", action="append", help="grade only this assignment (repeatable)")
    g.add_argument("--roster", help="CSV (id/student_id column) or one id per line; default grading/roster.csv")
    g.add_argument("--workers", type=int, help="LocalCluster worker processes (default: all cores)")
    g.add_argument("--scheduler", help="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    g.add_argument("--cell-timeout", type=int, default=Limits.cell_timeout, help="seconds per cell")
    g.add_argument("--notebook-timeout", type=int, default=Limits.notebook_timeout, help="seconds per notebook")
    g.add_argument("--memory-mb", type=int, default=Limits.memory_mb,
                   help="memory of one submission: address space of each process and resident memory of all")
    g.add_argument("--cpu-seconds", type=int, help="CPU-time limit of a kernel (default: notebook timeout + 60)")
    g.add_argument("--isolation", default="auto", choices=["auto", "full", "net", "none"])
    g.add_argument("--unsafe", action="store_true",
                   help="allow grading below the 'full' sandbox (net: without root; none: no isolation)")
    g.add_argument("--max-processes", type=int, default=Limits.max_processes, help="processes of one submission")
    g.add_argument("--disk-mb", type=int, default=Limits.disk_mb, help="MiB one submission may write")
    g.add_argument("--no-feedback", action="store_true", help="skip the HTML feedback")
    g.add_argument("--json", action="store_true", help="print the run summary as JSON")
    e = sub.add_parser("export", help="rewrite grades.csv from the gradebook (e.g. after manual grading)")
    e.add_argument("--roster")
    sub.add_parser("check", help="lint the source test cells and show the sandbox level available here")
    args = p.parse_args(argv)
    course = Course.load(args.course_root)

    if args.command == "release":
        names = course.release_all(args.assignments)
        print(f"Released {len(names)} assignments into {course.release}")
        return 0
    roster_path = getattr(args, "roster", None) or (course.root / "roster.csv")
    from .driver import export, grade, read_roster

    roster = read_roster(roster_path) if Path(roster_path).exists() else None
    if args.command == "export":
        print(export(course, roster))
        return 0
    if args.command == "check":
        problems = check_test_cells(course)
        print("\n".join(problems) or "test cells: ok")
        kernel = in_kernel_tests(course)
        total = hidden_test_cells(course)
        print(f"test cells with hidden tests: {total}, checked by the grader outside the kernel: "
              f"{total - len(kernel)}" + (f"; in the kernel (scanner-protected only): {', '.join(kernel)}"
                                          if kernel else ""))
        print("sandbox level here:", probe_isolation("auto"))
        return 1 if problems else 0
    limits = {"cell_timeout": args.cell_timeout, "notebook_timeout": args.notebook_timeout,
              "memory_mb": args.memory_mb, "cpu_seconds": args.cpu_seconds}
    limits.update(max_processes=args.max_processes, disk_mb=args.disk_mb)
    options = {"limits": limits, "isolation": args.isolation, "unsafe": args.unsafe, "feedback": not args.no_feedback,
               "params": {"fast": True, "device": "cpu", "out_dir": "artifacts"}}
    summary = grade(course, args.submissions, assignments=args.assignment, roster=roster, workers=args.workers,
                    scheduler=args.scheduler, options=options)
    if args.json:
        print(json.dumps(summary, indent=1))
    print(f"{summary['submissions']} submissions, {summary['wall_seconds']} s on {summary['workers']} workers "
          f"({summary['seconds_per_submission']} s per submission); sandbox: {', '.join(summary['isolation'])}")
    print(f"grades: {summary['csv']}\nreport: {summary['report']}\nfeedback: {course.root / 'feedback'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
