import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("COURSE_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path / "out"


def pytest_ignore_collect(collection_path, config):
    """nbval compares only the solution notebooks (reference outputs); never submissions or learner copies."""
    if collection_path.suffix == ".ipynb":
        return ROOT / "solutions" not in collection_path.parents
    return None


def pytest_collection_modifyitems(config, items):
    """Keep each notebook's nbval cells on one xdist worker (they share one kernel): run with --dist loadgroup."""
    for item in items:
        path = Path(str(item.fspath))
        if path.suffix == ".ipynb":
            item.add_marker(pytest.mark.xdist_group(path.stem))
