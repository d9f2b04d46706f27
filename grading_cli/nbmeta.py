"""Notebook metadata helpers shared by collect, repair, course and task: cell kinds and file names."""
from __future__ import annotations

import re

# A notebook whose released fixed cells and grade ids are at least this share of a candidate's is taken for it.
CONTENT_MATCH = 0.3
RENAMED = re.compile(r"^(copy of |copia de |kopie von )|[-_ ]?copy\d*$|[ _-]?\(\d+\)$|[-_ ](final|v\d+|submission)$",
                     re.I)


def kind_of(meta: dict) -> str | None:
    """nbgrader's cell kinds: test (autograded tests), solution, manual (graded answer), task, locked."""
    if not meta or not meta.get("grade_id"):
        return None
    if meta.get("task"):
        return "task"
    if meta.get("grade") and meta.get("solution"):
        return "manual"
    if meta.get("grade"):
        return "test"
    if meta.get("solution"):
        return "solution"
    return "locked" if meta.get("locked") else None


def plain_stem(filename: str) -> str:
    """``Copy of 01_x (2).ipynb`` -> ``01_x``: a file name without the marks editors and LMSs add."""
    stem = filename.rsplit("/", 1)[-1].removesuffix(".ipynb").strip()
    while True:
        new = RENAMED.sub("", stem).strip()
        if new == stem:
            return stem.lower()
        stem = new
