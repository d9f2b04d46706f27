"""The stored results (``autograded/<student>/<assignment>/grading_result.json``) and how to read them."""
from __future__ import annotations

import json
from pathlib import Path


def result_path(root: Path, student: str, assignment: str) -> Path:
    return Path(root) / "autograded" / student / assignment / "grading_result.json"


def load_results(course) -> dict[tuple[str, str], dict]:
    """{(student, assignment): result} for every stored result under the course root."""
    out = {}
    for path in sorted((course.root / "autograded").glob("*/*/grading_result.json")):
        r = json.loads(path.read_text())
        out[(r["student"], r["assignment"])] = r
    return out


def flag_codes(result: dict) -> set[str]:
    return {f["code"] for nb in result["notebooks"] for f in nb["flags"]}
