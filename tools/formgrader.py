"""Open nbgrader's formgrader on the course the way that works (``make formgrader``).

    python tools/formgrader.py [--course-root grading] [--prepare-only] [-- extra jupyter lab arguments]

Three things go wrong when formgrader is started by hand (``cd grading && ../.venv/bin/jupyter lab``):

* nbgrader runs ``alembic`` from PATH when it creates the gradebook; without this interpreter's ``bin/`` on
  PATH formgrader hangs on "Loading, please wait..." and leaves a gradebook whose tables exist but whose
  ``alembic_version`` table does not, which later nbgrader commands trip on. Here PATH is set first, and a
  gradebook left half made by such a start is repaired (its tables were created at the current schema, so it
  is stamped with nbgrader's current alembic revision; nothing is deleted);
* an assignment missing from the gradebook (a fresh clone has none) is released first (``nbgrader
  generate_assignment``, which rewrites notebooks/ byte for byte as ``make release`` does);
* the exchange directory (``c.Exchange.root`` in nbgrader_config.py, inside the course) must exist, or a banner
  says it does not.

Then JupyterLab starts in the course root, with ``--allow-root`` only when running as root. Nbgrader >
Formgrader in the menu opens the gradebook; the recipe notes are graded there ("Manual grading").
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _config(course_root: Path):
    from traitlets.config.loader import PyFileConfigLoader

    return PyFileConfigLoader("nbgrader_config.py", path=str(course_root)).load_config()


def repair_gradebook(db_path: Path) -> str:
    """'missing', 'ok' or 'repaired': stamp a gradebook that has tables but no alembic_version table."""
    if not db_path.exists():
        return "missing"
    with sqlite3.connect(db_path) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return "missing"
        if "alembic_version" in tables and con.execute("SELECT count(*) FROM alembic_version").fetchone()[0]:
            return "ok"
        os.environ["PATH"] = tool_env()["PATH"]
        from nbgrader.api import get_alembic_version

        version = get_alembic_version()
        con.execute("CREATE TABLE IF NOT EXISTS alembic_version (version_num VARCHAR(32) NOT NULL)")
        con.execute("DELETE FROM alembic_version")
        con.execute("INSERT INTO alembic_version (version_num) VALUES (?)", (version,))
    return "repaired"


def prepare(course_root: Path) -> dict:
    """Exchange folder, a complete gradebook, every source assignment in it; returns what was done."""
    cfg = _config(course_root)
    cd = cfg.CourseDirectory
    base = Path(cd.get("root", course_root))
    exchange = Path(cfg.Exchange.get("root", base / "exchange"))
    exchange.mkdir(parents=True, exist_ok=True)
    db_url = cd.get("db_url", f"sqlite:///{base / 'gradebook.db'}")
    if not db_url.startswith("sqlite:///"):
        raise ValueError(f"only a sqlite gradebook is handled here, got db_url={db_url!r}")
    state = repair_gradebook(Path(db_url.removeprefix("sqlite:///")))
    source = (base / cd.get("source_directory", "source")).resolve()
    wanted = sorted(p.name for p in source.glob("*/") if list(p.glob("*.ipynb")))
    os.environ["PATH"] = tool_env()["PATH"]
    from nbgrader.api import Gradebook

    with Gradebook(db_url, course_id=cd.get("course_id", "")) as gb:
        have = {a.name for a in gb.assignments}
    released = [a for a in wanted if a not in have]
    for name in released:
        subprocess.run([str(BIN / "nbgrader"), "generate_assignment", name, "--force", "--log-level=WARN"],
                       cwd=base, env=tool_env(), check=True)
    return {"course_root": str(base), "exchange": str(exchange), "gradebook": state, "released": released}


def lab_command(course_root: Path, extra=()) -> list[str]:
    cmd = [str(BIN / "jupyter"), "lab", f"--ServerApp.root_dir={course_root}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    return cmd + list(extra)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--course-root", type=Path, default=ROOT / "grading")
    parser.add_argument("--prepare-only", action="store_true", help="set up the course, do not start JupyterLab")
    parser.add_argument("lab_args", nargs="*", help="passed to jupyter lab (after --)")
    args = parser.parse_args(argv)
    root = args.course_root.resolve()
    if not (root / "nbgrader_config.py").exists():
        parser.error(f"--course-root must hold nbgrader_config.py, got {root}")
    done = prepare(root)
    print(f"course root {done['course_root']} | gradebook {done['gradebook']}"
          f"{' -> created' if done['gradebook'] == 'missing' else ''} | exchange {done['exchange']}"
          + (f" | released {', '.join(done['released'])}" if done["released"] else ""))
    cmd = lab_command(root, args.lab_args)
    print(" ".join(cmd))
    if args.prepare_only:
        return 0
    print("Then in JupyterLab: Nbgrader > Formgrader (manual grading of the recipe notes).")
    os.chdir(root)
    os.execve(cmd[0], cmd, tool_env())
    return 0


if __name__ == "__main__":
    sys.exit(main())
