"""Run every solution notebook through papermill, in sequence, and write a summary.

    python tools/run_course.py [--full] [--only 03 04] [--notebooks-dir solutions] [--runs-dir runs]

Executed notebooks and each notebook's artifacts go to ``runs/<timestamp>/<notebook>/``; ``runs/latest``
points at the newest run; ``runs/<timestamp>/summary.csv`` has one row per notebook: status, seconds, the
failing cell and error if any, and the decisions the notebook recorded (``decisions.json``). A failing
notebook does not stop the others; the exit status is 1 if any failed.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from course_lib.runtime import KERNEL_ENV

ROOT = Path(__file__).resolve().parents[1]


def find_notebooks(notebooks_dir: Path, only=()) -> list[Path]:
    paths = sorted(notebooks_dir.glob("*/*.ipynb"))
    paths = [p for p in paths if ".ipynb_checkpoints" not in p.parts and p.parent.name == p.stem]
    if only:
        paths = [p for p in paths if any(p.stem.startswith(o) for o in only)]
    return paths


def _failure(err) -> tuple[str, str]:
    """(cell, error) from a papermill execution error."""
    cell = getattr(err, "exec_count", None)
    ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    return (f"In [{cell}]" if cell is not None else "?"), f"{ename}: {evalue}".strip()[:500]


def run_one(nb: Path, out_root: Path, *, fast: bool, timeout: int, kernel: str) -> dict:
    import papermill as pm

    out_dir = out_root / nb.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    row = {"notebook": nb.stem, "status": "ok", "seconds": 0.0, "cell": "", "error": ""}
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(nb), str(out_dir / nb.name), parameters={"fast": fast, "out_dir": str(out_dir)},
                            kernel_name=kernel, cwd=str(nb.parent), progress_bar=False,
                            execution_timeout=timeout, log_output=False)
    except Exception as err:  # noqa: BLE001 - report and go on with the next notebook
        row["status"] = "failed"
        row["cell"], row["error"] = _failure(err)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    decisions = out_dir / "decisions.json"
    row["decisions"] = json.dumps(json.loads(decisions.read_text()), sort_keys=True) if decisions.exists() else ""
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run the course notebooks with papermill.")
    p.add_argument("--full", action="store_true", help="full mode (default: fast mode, as in CI)")
    p.add_argument("--only", nargs="*", default=(), help="notebook prefixes, e.g. 00 03")
    p.add_argument("--notebooks-dir", default=str(ROOT / "solutions"))
    p.add_argument("--runs-dir", default=str(ROOT / "runs"))
    p.add_argument("--timeout", type=int, default=900, help="per-cell timeout in seconds")
    p.add_argument("--kernel", default="python3")
    args = p.parse_args(argv)

    notebooks = find_notebooks(Path(args.notebooks_dir), args.only)
    if not notebooks:
        print(f"No notebooks found in {args.notebooks_dir}: nothing to run.")
        return 0
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    runs = Path(args.runs_dir)
    out_root = runs / stamp
    out_root.mkdir(parents=True, exist_ok=True)
    latest = runs / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(stamp)
    # the regression kernel environment (one thread, pinned CPU kernels: the same numbers on any machine and
    # load) wherever the caller's environment says nothing else (docs/gpu.md runs it with COURSE_DEVICE=cuda);
    # papermill's `fast` parameter, not COURSE_FAST, sets the mode
    for key, value in KERNEL_ENV.items():
        if key != "COURSE_FAST":
            os.environ.setdefault(key, value)
    mode = "full" if args.full else "fast"
    print(f"Running {len(notebooks)} notebook(s) in {mode} mode into {out_root}")
    rows = []
    for nb in notebooks:
        row = run_one(nb, out_root, fast=not args.full, timeout=args.timeout, kernel=args.kernel)
        rows.append(row)
        extra = f"  {row['cell']} {row['error']}" if row["status"] != "ok" else f"  {row['decisions']}"
        print(f"  {row['notebook']:<32} {row['status']:<7} {row['seconds']:>7.1f}s{extra}", flush=True)
    with open(out_root / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["notebook", "status", "seconds", "cell", "error", "decisions"])
        writer.writeheader()
        writer.writerows(rows)
    total = sum(r["seconds"] for r in rows)
    failed = [r["notebook"] for r in rows if r["status"] != "ok"]
    names = ": " + ", ".join(failed) if failed else ""
    print(f"Total {total:.1f}s; {len(rows) - len(failed)} ok, {len(failed)} failed{names}")
    print(f"Results: {out_root} (also runs/latest); summary: {out_root / 'summary.csv'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
