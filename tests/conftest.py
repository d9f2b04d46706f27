import os
import sys
from pathlib import Path

import matplotlib
import pytest
import torch

os.environ.setdefault("COURSE_PROGRESS", "0")
matplotlib.use("Agg")  # in this process only: notebook kernels keep the inline backend learners see
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/nbutil.py


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path / "out"


@pytest.fixture
def one_thread():
    """Many tiny ops: one intra-op thread is faster and steadier than two on a busy 2-core machine (and it is
    what the notebook kernels use, OMP_NUM_THREADS=1, so a test replaying a notebook gets its numbers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
