"""Collection rule shared by the unit tests and nbval (`pytest --nbval solutions`, see the Makefile)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path, config):
    """nbval compares only the solution notebooks (reference outputs); never submissions or learner copies."""
    if collection_path.suffix == ".ipynb":
        return ROOT / "solutions" not in collection_path.parents
    return None

