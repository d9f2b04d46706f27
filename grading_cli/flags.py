"""Every code the grader writes into a result, with its help text: one table for report.md, the gradebook
(tamper codes mark a submission *flagged*) and docs/grading.md.

A *flag* deserves an instructor's look; a *repair* is harmless (the submission grades as the learner meant).
"""
from __future__ import annotations

FLAGS = {
    "missing": "no submission from this roster student",
    "unreadable": "the file is not a readable notebook: 0 for what could not be graded",
    "no_notebook": "the submission holds no notebook matching the released one",
    "edited_tests": "a test cell was edited (the released test was restored and used)",
    "edited_locked": "a read-only cell was edited (restored)",
    "deleted_cells": "a test or read-only cell was deleted (restored and graded)",
    "changed_points": "the points in the cell metadata were changed (the gradebook's points are used)",
    "changed_metadata": "nbgrader metadata (grade/solution/locked) was changed (restored)",
    "answer_missing": "an answer cell could not be found: graded as blank",
    "suspicious_code": "the learner's code reaches into the kernel, the builtins, imported modules or the "
                       "grader's machinery, or ships files that shadow installed packages: review by hand "
                       "(the detail says what and where)",
    "reply_error": "a cell's execution reply said error although no error was shown (error reporting was "
                   "tampered with): the cell scores 0",
    "cell_timeout": "a cell hit the per-cell time limit and was interrupted",
    "notebook_timeout": "the whole-notebook time limit was reached: later cells did not run",
    "kernel_killed": "the kernel ignored the interrupt and was killed: later cells did not run",
    "kernel_died": "the kernel died (os._exit, a crash, or a memory/CPU/process/disk limit): later cells did not run",
    "limit_exceeded": "the submission's processes together went over a total (memory, processes, disk or "
                      "files; the detail says which) and were all killed: later cells did not run",
    "kernel_failed": "the kernel did not start (grader problem: see the result file)",
    "output_truncated": "outputs were cut to the per-cell or per-notebook limit (display updates count)",
    "isolation_degraded": "the sandbox was weaker than 'full' on the worker (see the security model)",
    "needs_manual_grade": "points wait for a human grade (formgrader)",
    "grader_error": "the grader failed on this submission (see report); it did not stop the batch",
}
REPAIRS = {
    "renamed": "the notebook was renamed (e.g. -Copy1, 'Copy of'): matched by name and content",
    "extra_notebooks": "other copies of the notebook were ignored",
    "metadata_restored": "nbgrader cell metadata was missing (Colab...): cells matched by position and content",
    "duplicate_cells": "copied cells (repeated grade ids or copies of graded cells): one kept",
    "reordered": "cells were moved: graded in the released order",
    "restored_cells": "a deleted plain code cell was put back from the release",
}
# Changes to what is graded: the submission is marked *flagged* in the gradebook for manual review.
TAMPER = frozenset({"edited_tests", "edited_locked", "deleted_cells", "changed_points", "changed_metadata",
                    "suspicious_code", "reply_error"})


def flag(code: str, notebook: str, detail: str = "") -> dict:
    """One flag or repair record; ``code`` must be in FLAGS or REPAIRS (a typo would hide a finding)."""
    if code not in FLAGS and code not in REPAIRS:
        raise ValueError(f"unknown flag code {code!r}: add it with its help text to grading_cli/flags.py")
    return {"code": code, "notebook": notebook, "detail": detail}
