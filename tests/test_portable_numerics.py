"""The pinned CPU kernels of the regression environment do what they are there for.

``course_lib.runtime.PINNED_NUMERICS`` holds every library's CPU dispatch at AVX2, so that reference outputs
made on one x86-64 machine hold on any other with AVX2, with or without AVX-512. On one machine this shows as:

* pinned == pinned on a (simulated) AVX2-only CPU, bit for bit, for each kind of kernel the notebooks use;
* on a CPU with AVX-512, each pin changes the bits of the kernel it governs (so dropping a pin is seen), and the
  unpinned kernels make nbval fail against the stored reference outputs (so the guard can fail).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from nbutil import ROOT, kernel_env, notebooks

from course_lib.runtime import PINNED_NUMERICS

PROBE = r"""
import hashlib, json
import numpy as np
import torch
import torch.nn.functional as F
from course_lib.models import MLP
from course_lib.runtime import seed_everything

def h(t):
    t = t.detach().numpy() if torch.is_tensor(t) else t
    return hashlib.sha1(np.ascontiguousarray(t).tobytes()).hexdigest()[:12]

g = torch.Generator().manual_seed(0)
a, b = torch.randn(512, 512, generator=g), torch.randn(300, 64, generator=g)
out = {"capability": torch.backends.cpu.get_cpu_capability(),
       "matmul": h(a @ a), "gelu": h(F.gelu(a)), "softmax": h(torch.log_softmax(a, 1)),
       "numpy_exp": h(np.exp(np.random.default_rng(0).standard_normal(10000)))}
seed_everything(0)
model = MLP(hidden=(256, 256))
opt = torch.optim.Adam(model.parameters(), lr=0.1)
y = torch.randint(0, 10, (300,), generator=g)
for _ in range(5):  # a few steps of notebook 00's broken run: chaotic, so any rounding difference grows
    opt.zero_grad()
    F.cross_entropy(model(b), y).backward()
    opt.step()
out["training"] = h(torch.cat([p.flatten() for p in model.parameters()]))
print(json.dumps(out))
"""

# What library dispatchers pick on an AVX2-only CPU: the same values the pins hold, plus MKL's own cap.
AVX2_CPU = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
HAS_AVX512 = "avx512f" in (open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else "")


def _probe(drop=(), **extra) -> dict:
    env = {k: v for k, v in kernel_env(**extra).items() if k not in drop}
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pinned():
    return _probe()


def test_pinned_kernels_equal_an_avx2_only_cpu(pinned):
    assert pinned["capability"] == "AVX2"
    assert _probe(**AVX2_CPU) == pinned


@pytest.mark.skipif(not HAS_AVX512, reason="on a CPU without AVX-512 the native kernels are the pinned ones")
@pytest.mark.parametrize("pin, changes", [("ATEN_CPU_CAPABILITY", "training"), ("ONEDNN_MAX_CPU_ISA", "gelu"),
                                          ("NPY_DISABLE_CPU_FEATURES", "numpy_exp")])
def test_each_pin_changes_the_kernels_it_governs(pinned, pin, changes):
    """Measured on an AMD EPYC with AVX-512: without the pin, the probe's bits change. (MKL_CBWR=AVX2 is not in
    this list: MKL takes its AVX2 path on AMD CPUs anyway; on Intel CPUs with AVX-512 it is the pin of matmuls.)"""
    assert pin in PINNED_NUMERICS
    unpinned = _probe(drop=(pin,))
    assert unpinned[changes] != pinned[changes], (pin, unpinned, pinned)


@pytest.mark.notebooks
@pytest.mark.skipif(not HAS_AVX512, reason="on a CPU without AVX-512 the native kernels are the pinned ones")
def test_unpinned_kernels_fail_nbval_against_the_references(tmp_path):
    """The references were made pinned; replayed with this CPU's native AVX-512 kernels, nbval must mismatch
    (the same notebook passes nbval pinned, in the main pass and as on an AVX2-only CPU, in `make test`)."""
    target = next(p for p in notebooks("solutions") if p.stem.startswith("00"))
    work = tmp_path / "nb"
    shutil.copytree(target.parent, work, ignore=shutil.ignore_patterns("artifacts"))
    env = {k: v for k, v in kernel_env().items() if k not in PINNED_NUMERICS}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--nbval",
                           "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"),
                           "--rootdir", str(work), "-c", os.devnull, str(work / target.name)],
                          env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "mismatch" in out, out[-3000:]


def test_learners_are_not_pinned():
    """Only the regression kernels are pinned: importing course_lib sets none of these in a learner's process."""
    code = ("import os, course_lib, course_lib.train, course_lib.notebook; "
            f"print([k for k in {sorted(PINNED_NUMERICS)!r} if k in os.environ])")
    env = {k: v for k, v in os.environ.items() if k not in PINNED_NUMERICS}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]
