"""Stamp the cells every notebook shares (Colab badge, setup cell) into the solution notebooks.

The repository URL comes from one setting, ``[tool.course]`` in pyproject.toml. Cells are found by their
tags (``colab-badge``, ``course-setup``); everything else in a notebook is left alone.

    python tools/sync_notebooks.py            # rewrite solutions/*/*.ipynb where they differ
    python tools/sync_notebooks.py --check    # exit 1 if any notebook is out of sync (used by the tests)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def course_settings() -> dict:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data["tool"]["course"]


def badge_source(name: str) -> str:
    s = course_settings()
    repo = s["repository"].rstrip("/").removeprefix("https://github.com/")
    url = f"https://colab.research.google.com/github/{repo}/blob/{s['branch']}/notebooks/{name}/{name}.ipynb"
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})\n"
            "*Locally: `make lab` opens this folder in JupyterLab. In Colab: run the setup cell below first "
            "(Runtime > Change runtime type > GPU is optional).*")


def setup_source() -> str:
    s = course_settings()
    return f'''# Setup: installs course_lib only if missing (Colab, a fresh environment); never reinstalls torch.
import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile

COURSE_REPOSITORY = "{s["repository"]}"
FORCE_INSTALL = False  # set True and re-run if the version check below asks you to update

if FORCE_INSTALL or importlib.util.find_spec("course_lib") is None:
    source = os.environ.get("COURSE_LIB_SOURCE") or f"git+{{COURSE_REPOSITORY}}@{s["branch"]}"
    command = [sys.executable, "-m", "pip", "install", "-q", source]
    if importlib.util.find_spec("torch") is not None:  # keep the torch this runtime already has
        pin = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
        pin.write(f"torch=={{importlib.metadata.version('torch')}}\\n")  # no import: numpy may come after
        pin.close()
        command += ["--constraint", pin.name]
    if FORCE_INSTALL:
        command += ["--upgrade", "--no-deps", "--force-reinstall"]
    print("Installing course_lib from", source)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        said = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()][-3:]
        raise SystemExit(
            f"Could not install course_lib from {{source}}: the course repository is unreachable or not published.\\n"
            "Check the internet connection (in Colab: Runtime > Restart session, then run this cell again), or ask\\n"
            "your instructor for the course's repository and put it in COURSE_REPOSITORY above.\\n"
            "pip said: " + " | ".join(said))
    importlib.invalidate_caches()'''


def sync_notebook(path: Path, check: bool = False) -> bool:
    """Bring the shared cells of one notebook up to date; return True if it changed (or would)."""
    nb = nbformat.read(path, as_version=4)
    name = path.stem
    wanted = {"colab-badge": badge_source(name), "course-setup": setup_source()}
    changed = False
    for cell in nb.cells:
        for tag in cell.get("metadata", {}).get("tags", []):
            if tag in wanted and cell.source != wanted[tag]:
                cell.source, changed = wanted[tag], True
    missing = [t for t in wanted if not any(t in c.get("metadata", {}).get("tags", []) for c in nb.cells)]
    if missing:
        raise ValueError(f"{path}: no cell tagged {missing}; add them (see tools/sync_notebooks.py)")
    if changed and not check:
        nbformat.write(nb, path)
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report notebooks that are out of sync")
    args = parser.parse_args(argv)
    stale = [p for p in sorted((ROOT / "solutions").glob("*/*.ipynb")) if sync_notebook(p, check=args.check)]
    for p in stale:
        print(("out of sync: " if args.check else "updated: ") + str(p.relative_to(ROOT)))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
