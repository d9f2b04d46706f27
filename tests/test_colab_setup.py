"""The Colab code path: a fresh environment without course_lib, whose setup cell installs it.

The setup cell installs from ``COURSE_LIB_SOURCE`` when set (here: this checkout), else from the repository
URL (Colab). It must install course_lib and its light dependencies without touching the torch that is there.
"""
import json
import subprocess
import sys

import pytest
from nbutil import ROOT, errors, execute, notebooks

pytestmark = [pytest.mark.notebooks, pytest.mark.slow]


def test_first_learner_notebook_installs_course_lib_in_fresh_venv(tmp_path):
    released = notebooks("notebooks")
    if not released:
        pytest.skip("no released notebooks yet")
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + ["torch==2.13.0"], check=True, capture_output=True)
    subprocess.run(pip + ["ipykernel"], check=True, capture_output=True)
    before = subprocess.run([py, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True,
                            check=True).stdout.strip()
    missing = subprocess.run([py, "-c", "import course_lib"], capture_output=True)
    assert missing.returncode != 0, "the fresh environment must start without course_lib"
    subprocess.run([py, "-m", "ipykernel", "install", "--prefix", str(tmp_path / "k"), "--name", "fresh"],
                   check=True, capture_output=True)

    path = released[0]
    nb = execute(path, cwd=tmp_path, allow_errors=True, kernel_name="fresh", timeout=900,
                 parameters={"out_dir": str(tmp_path / "artifacts")},
                 env={"COURSE_LIB_SOURCE": str(ROOT), "JUPYTER_PATH": str(tmp_path / "k" / "share" / "jupyter")})
    setup = next(c for c in nb.cells if "course-setup" in c.metadata.get("tags", []))
    assert "Installing course_lib from" in "".join(o.get("text", "") for o in setup.outputs)
    unexpected = [(e["ename"], e["evalue"][:200]) for _, c, e in errors(nb)
                  if not c.metadata.get("nbgrader", {}).get("grade") and e["ename"] != "NotImplementedError"]
    assert not unexpected, unexpected
    info = subprocess.run([py, "-c", "import json, torch, course_lib; print(json.dumps([torch.__version__, "
                           "course_lib.__version__]))"], capture_output=True, text=True, check=True).stdout
    torch_after, lib_version = json.loads(info)
    assert torch_after == before, "the setup cell must never reinstall torch"
    import course_lib

    assert lib_version == course_lib.__version__


def test_setup_cell_says_plainly_when_the_repository_is_unreachable(tmp_path):
    """No pip traceback: one message naming the source, what to check, and pip's last words."""
    sys.path.insert(0, str(ROOT / "tools"))
    import os

    import sync_notebooks

    script = tmp_path / "setup_cell.py"
    script.write_text(sync_notebooks.setup_source())
    env = dict(os.environ, COURSE_LIB_SOURCE=str(tmp_path / "no-such-repository"), PIP_NO_INDEX="1")
    # -S: this interpreter without its site-packages, i.e. an environment where course_lib is missing
    proc = subprocess.run([sys.executable, "-S", str(script)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "Could not install course_lib from" in proc.stderr and "no-such-repository" in proc.stderr, proc.stderr
    assert "COURSE_REPOSITORY" in proc.stderr and "pip said:" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
