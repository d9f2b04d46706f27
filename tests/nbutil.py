"""Helpers for tests that execute notebooks, and the seeds the scenario tests prove their claims on."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from course_lib.runtime import KERNEL_ENV

ROOT = Path(__file__).resolve().parents[1]


def scenario_seeds() -> range:
    """The seeds the scenario tests prove their claims on: 0-4, or 0..N-1 with ``COURSE_TEST_SEEDS=N``
    (``make seeds`` runs 20)."""
    n = int(os.environ.get("COURSE_TEST_SEEDS", "5"))
    if n < 1:
        raise ValueError(f"COURSE_TEST_SEEDS must be a whole number >= 1, got {n}")
    return range(n)


def _one_thread_call(fn_seed):
    import torch

    torch.set_num_threads(1)
    fn, seed = fn_seed
    return fn(seed)


def map_seeds(fn, seeds) -> list:
    """``[fn(seed) for seed in seeds]`` in two spawned worker processes with one intra-op thread each (the two
    cores of CI; about half the time of one process). ``fn`` must be a module-level function (it is pickled)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_one_thread_call, [(fn, seed) for seed in seeds]))


def notebooks(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).glob("[0-9]*/*.ipynb") if p.parent.name == p.stem)


def nb_ids(paths) -> list[str]:
    return [p.stem for p in paths]


def kernel_env(**extra) -> dict:
    """This process's environment with the regression kernel's settings (``course_lib.runtime.KERNEL_ENV``)."""
    env = dict(os.environ, **KERNEL_ENV)
    env.update(extra)
    return env


def execute(path: Path, *, cwd: Path, allow_errors: bool = False, timeout: int = 600, parameters=None,
            kernel_name: str = "python3", env: dict | None = None):
    """Execute a notebook with nbclient (parameters injected papermill-style) and return it."""
    import papermill as pm

    nb = pm.iorw.load_notebook_node(str(path))  # papermill's loader adds the metadata it needs
    if parameters:
        nb = pm.parameterize.parameterize_notebook(nb, parameters)
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name, allow_errors=allow_errors,
                            resources={"metadata": {"path": str(cwd)}})
    old = dict(os.environ)
    os.environ.update(kernel_env(**(env or {})))
    try:
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return nb


def errors(nb) -> list[tuple[int, dict, dict]]:
    """(index, cell, error output) for every cell that raised."""
    out = []
    for i, cell in enumerate(nb.cells):
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                out.append((i, cell, o))
    return out


def python() -> str:
    return sys.executable
