"""Collection rules shared by the unit tests and nbval (pytest --nbval solutions)."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path, config):
    """nbval compares only the solution notebooks (reference outputs); never submissions or learner copies."""
    if collection_path.suffix == ".ipynb":
        return ROOT / "solutions" not in collection_path.parents
    return None


def pytest_collection_modifyitems(config, items):
    """Keep each notebook's nbval cells on one xdist worker (they share one kernel): run with --dist loadgroup."""
    for item in items:
        if Path(str(item.fspath)).suffix == ".ipynb":
            item.add_marker(pytest.mark.xdist_group(Path(str(item.fspath)).stem))
