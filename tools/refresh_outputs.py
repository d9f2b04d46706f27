"""Re-execute the solution notebooks in place (fast mode, seed 0, CPU) so they carry reference outputs.

nbval (`make test`) re-runs them and compares every output cell with these references; run this after an
intended change to what the notebooks show (`make outputs`), review the diff, commit.

    python tools/refresh_outputs.py [prefixes...]     # e.g. 03 07; default: all
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from course_lib.runtime import KERNEL_ENV  # the same environment nbval's kernels get in `make test`

ROOT = Path(__file__).resolve().parents[1]


def refresh(path: Path, timeout: int = 900) -> None:
    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nb.metadata.pop("papermill", None)
    nbformat.write(nb, path)


def main(argv=None) -> int:
    prefixes = (argv if argv is not None else sys.argv[1:]) or [""]
    os.environ.update(KERNEL_ENV)
    paths = [p for p in sorted((ROOT / "solutions").glob("*/*.ipynb"))
             if p.parent.name == p.stem and any(p.stem.startswith(x) for x in prefixes)]
    for path in paths:
        print("executing", path.relative_to(ROOT), flush=True)
        refresh(path)
    print(f"refreshed {len(paths)} notebook(s): review `git diff solutions/`, then commit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
