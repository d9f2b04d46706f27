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
