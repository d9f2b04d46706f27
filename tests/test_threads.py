"""The kernel's thread count: course_lib picks the measured best once, says so, and yields to explicit settings."""
import os
import subprocess
import sys

import pytest

PROBE = ("import torch, course_lib; course_lib.seed_everything(0); course_lib.seed_everything(1); "
         "print('THREADS', torch.get_num_threads())")


def _run(code=PROBE, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "COURSE_THREADS")}
    proc = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                          timeout=120)
    return proc


def test_learner_kernel_gets_the_measured_count_printed_once():
    from course_lib.runtime import COURSE_THREADS

    proc = _run()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("torch threads:") == 1, proc.stdout
    assert f"THREADS {COURSE_THREADS}" in proc.stdout


@pytest.mark.parametrize("env,want,printed", [({"OMP_NUM_THREADS": "2"}, 2, False), ({"COURSE_THREADS": "2"}, 2, True),
                                               ({"COURSE_THREADS": "2", "OMP_NUM_THREADS": "1"}, 2, True)])
def test_explicit_settings_are_respected(env, want, printed):
    proc = _run(**env)
    assert proc.returncode == 0, proc.stderr
    assert f"THREADS {want}" in proc.stdout and ("torch threads:" in proc.stdout) == printed, proc.stdout


def test_setup_threads_overrides_and_checks_its_argument():
    code = ("import torch, course_lib; course_lib.seed_everything(0); course_lib.setup_threads(2); "
            "course_lib.seed_everything(0); print('THREADS', torch.get_num_threads())\n"
            "try:\n    course_lib.setup_threads(0)\nexcept ValueError as e:\n    print('ERR', e)")
    proc = _run(code)
    assert "THREADS 2" in proc.stdout and "ERR threads (setup_threads()) must be an int >= 1, got 0" in proc.stdout
    bad = _run(COURSE_THREADS="many")
    assert bad.returncode != 0 and "COURSE_THREADS" in bad.stderr and "'many'" in bad.stderr


def test_omp_num_threads_set_after_torch_was_imported_is_applied():
    """A script that sets OMP_NUM_THREADS after importing torch (torch has read its default by then) still gets
    the count it names: the transfer scenario's full-mode numbers depend on it (2 threads kept 0.78, 1 kept 0.70)."""
    code = ("import os, torch; torch.set_num_threads(2); os.environ['OMP_NUM_THREADS'] = '1'; import course_lib; "
            "course_lib.seed_everything(0); print('THREADS', torch.get_num_threads())")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert "THREADS 1" in proc.stdout and "torch threads:" not in proc.stdout, proc.stdout
