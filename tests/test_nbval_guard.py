"""The regression guard bites: change one default that notebooks print, and nbval must fail.

A temporary copy of course_lib with ``digits_split``'s default fractions changed from (0.6, 0.2, 0.2) to
(0.7, 0.15, 0.15) is put first on the kernel's path; nbval then re-runs the first solution notebook against
its stored reference outputs. The split sizes (and every number after them) move, so nbval must report an
output mismatch. Without the change the same notebook passes in the main nbval run of `make test`.
"""
import os
import shutil
import subprocess
import sys

import pytest
from nbutil import ROOT, kernel_env, notebooks

pytestmark = pytest.mark.notebooks


def test_changed_default_makes_nbval_fail(tmp_path):
    sols = notebooks("solutions")
    if not sols:
        pytest.skip("no solution notebooks yet")
    target = sols[0]
    lib = tmp_path / "course_lib"
    shutil.copytree(ROOT / "course_lib", lib, ignore=shutil.ignore_patterns("__pycache__"))
    data = lib / "data.py"
    text = data.read_text()
    assert "fractions=(0.6, 0.2, 0.2)" in text
    data.write_text(text.replace("fractions=(0.6, 0.2, 0.2)", "fractions=(0.7, 0.15, 0.15)", 1))
    env = kernel_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    work = tmp_path / "nb"
    shutil.copytree(target.parent, work, ignore=shutil.ignore_patterns("artifacts"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--nbval",
                           "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"),
                           "--rootdir", str(work), "-c", os.devnull, str(work / target.name)],
                          env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "mismatch" in out, out[-3000:]
