"""Seeding, device choice, fast mode and version checks: the few things every notebook does first."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["seed_everything", "setup_threads", "get_device", "is_fast", "check_version", "PINNED_NUMERICS",
           "KERNEL_ENV"]

PINNED_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2",
                   "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512F AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR"}
"""CPU kernel choices pinned for the regression and grading kernels (never for learners).

Float results depend on the code path each library picks for the CPU it runs on: torch's vectorised
kernels (``ATEN_CPU_CAPABILITY``: ``default``, ``avx2``, ``avx512``), oneDNN's (``ONEDNN_MAX_CPU_ISA``; it
serves e.g. ``gelu`` on CPU), MKL's matmuls (``MKL_CBWR``, MKL's conditional numerical reproducibility) and
NumPy's dispatched loops (``NPY_DISABLE_CPU_FEATURES``: its AVX-512 targets, under NumPy 1 and 2 names). With
all of them held at AVX2, every x86-64 CPU that has AVX2, with or without AVX-512, runs the same kernels and
so gives the same bits: reference outputs made on one machine hold on another (``tests/test_portable_numerics.py``
shows that each pin changes what it should). Learners are never pinned: their kernels run native, at full speed.
"""

KERNEL_ENV = {"COURSE_FAST": "1", "COURSE_PROGRESS": "0", "COURSE_DEVICE": "cpu", "PYTHONWARNINGS": "ignore",
              "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **PINNED_NUMERICS}
"""The one environment of every regression kernel: ``make course``, ``make outputs``, nbval, the notebook
tests and the grader. Fast mode, CPU, one intra-op thread (the numbers depend on the thread count too), no
progress bars, and :data:`PINNED_NUMERICS`."""


COURSE_THREADS = 1
"""Intra-op threads for the course's models, measured (issue 12; median of 3 one-epoch fits, wall time, 2-core
machine). Idle machine: MLP of notebook 00 0.032 s (1 thread), 0.029 s (2), 0.095 s (4, more threads than cores);
the TinyTransformer of 05/06/09 0.848 s, 0.741 s, 2.400 s. Busy machine (torch's default is one thread per core):
2 threads took 8x the wall time of 1 for the MLP and 24x for the TinyTransformer. One thread loses at most 13%
when the machine is idle and avoids the 8-24x when it is not; it is also the count the grader and the reference
outputs use (the numbers depend on the thread count)."""

_THREADS_CHOSEN: int | None = None


def setup_threads(threads: int | None = None, *, verbose: bool = True) -> int:
    """Set torch's intra-op thread count for this kernel once, and say so; returns the count in use.

    Precedence: ``threads`` (an int >= 1) > the environment variable ``COURSE_THREADS`` > an explicit
    ``OMP_NUM_THREADS`` (its first value, applied with ``torch.set_num_threads`` even when it was set after torch
    was imported; nothing printed) > :data:`COURSE_THREADS`. Called by
    :func:`seed_everything`; later calls without ``threads`` change nothing.
    """
    global _THREADS_CHOSEN
    if threads is None and _THREADS_CHOSEN is not None:
        return torch.get_num_threads()
    source = "setup_threads()"
    if threads is None and os.environ.get("COURSE_THREADS", "").strip():
        threads, source = os.environ["COURSE_THREADS"].strip(), "COURSE_THREADS"
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").strip():
        # applied, not just trusted: a script may set it after torch was imported (torch read its default then)
        threads, source, verbose = os.environ["OMP_NUM_THREADS"].split(",")[0].strip(), "OMP_NUM_THREADS", False
    if threads is None:
        threads, source = COURSE_THREADS, "measured best for the course's small models"
    try:
        n = int(threads)
    except (TypeError, ValueError):
        n = 0
    if isinstance(threads, bool) or n < 1 or str(n) != str(threads).strip():
        raise ValueError(f"threads ({source}) must be an int >= 1, got {threads!r}")
    torch.set_num_threads(n)
    _THREADS_CHOSEN = n
    if verbose:
        print(f"torch threads: {n} ({source}; change with COURSE_THREADS=N or course_lib.setup_threads(N))")
    return n


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA) so that a CPU run repeats bit for bit.

    Returns a ``torch.Generator`` seeded with ``seed`` for data shuffling, so that the data order does
    not depend on how many random numbers model initialisation drew.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} ({seed!r})")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    seed = int(seed)
    setup_threads()  # once per kernel: the measured thread count, unless OMP_NUM_THREADS / COURSE_THREADS say
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return torch.Generator().manual_seed(seed)


def get_device(device: str | torch.device | None = "auto") -> torch.device:
    """Pick ``cuda`` > ``mps`` > ``cpu`` for ``"auto"`` (or None); otherwise return ``torch.device(device)``.

    The environment variable ``COURSE_DEVICE`` overrides ``"auto"`` (e.g. ``COURSE_DEVICE=cpu``).
    """
    if device is None or device == "auto":
        env = os.environ.get("COURSE_DEVICE", "").strip()
        if env and env != "auto":
            return get_device(env)
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here: use device='auto' or 'cpu'")
    return dev


def is_fast(default: bool = False) -> bool:
    """Fast mode from the environment variable ``COURSE_FAST`` ("1"/"true"/"yes" or "0"/"false"/"no")."""
    value = os.environ.get("COURSE_FAST")
    if value is None or value.strip() == "":
        return default
    value = value.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"COURSE_FAST must be 1/0 (or true/false), got {value!r}")


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_version(required: str, installed: str | None = None) -> str:
    """Stop with instructions when the installed course_lib is not the ``major.minor`` a notebook was written for.

    Patch releases are compatible; a different major or minor version raises ``RuntimeError`` whose message
    says exactly how to update. Returns the installed version.
    """
    from . import __version__

    installed = __version__ if installed is None else installed
    if _version_tuple(installed)[:2] != _version_tuple(required)[:2]:
        raise RuntimeError(
            f"This notebook was written for course_lib {required}, but {installed} is installed.\n"
            "Update it so the notebook and the library agree:\n"
            "  - in a clone of the course: git pull && make setup   (or: pip install -e .)\n"
            "  - in Colab or another environment: re-run the first (setup) cell with FORCE_INSTALL = True,\n"
            "    or: pip install --force-reinstall --no-deps 'course_lib @ git+<course repository URL>'\n"
            "then restart the kernel."
        )
    return installed
