import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("COURSE_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/nbutil.py


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path / "out"
