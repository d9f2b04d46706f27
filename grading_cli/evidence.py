"""Run-dependent answers, checked in the grader's own process against evidence extracted from the run.

An ``Evidence`` check (``grading_cli.checks``) names a *rule* here: a function of a :class:`Run` that
returns the expected value of each answer, computed in the grader's process with course_lib's own rules
(imported here, never in the kernel) from plain evidence only:

* the graded notebook's ``parameters`` cell, read with ``ast`` (literals only: ``seed = 0``), updated by the
  parameters the grader injects;
* files the notebook wrote in its job folder (e.g. ``{out_dir}/noisy_labels_history.csv``), read by the
  grader after the run without following links, size-capped, parsed defensively.

Nothing the learner's code could patch (a course_lib function, a notebook object) takes part. A rule that
cannot compute its value (no literal seed, a missing or malformed file, a history that contradicts its own
rule) raises :class:`Unavailable`: the check scores 0 and the reason says why (no learner text in it).
"""
from __future__ import annotations

import ast
import csv
import io
import math
import os
from dataclasses import dataclass, field

MAX_EVIDENCE_BYTES = 2**20  # per file: a history CSV of the course is a few kB


class Unavailable(Exception):
    """The evidence needed for the expected value is missing or inconsistent (the message is the reason)."""


@dataclass
class Run:
    """What the grader extracted from one run: ``params`` (literal parameters) and ``files`` ({path: bytes})."""

    params: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    def file(self, template: str) -> bytes:
        path = evidence_path(template, self.params)
        data = self.files.get(path)
        if data is None:
            raise Unavailable(f"the notebook did not write {path} (it must run to the end)")
        return data


def notebook_parameters(cells, injected: dict | None = None) -> dict:
    """Literal assignments of the notebook's ``parameters``-tagged cell(s) (``seed = 0``), updated by
    ``injected`` (the values the grader injects after that cell). A non-literal value is left out."""
    from .tamper import to_python

    out = {}
    for cell in cells:
        if cell.get("cell_type") != "code" or "parameters" not in cell.get("metadata", {}).get("tags", []):
            continue
        try:
            body = ast.parse(to_python(cell.get("source", "")) or "").body
        except SyntaxError:
            continue
        for node in body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                name = node.targets[0].id
                try:
                    out[name] = ast.literal_eval(node.value)
                except (ValueError, TypeError, SyntaxError, RecursionError):
                    out[name] = _NOT_LITERAL
    out.update(injected or {})
    return out


class _NotLiteral:
    def __repr__(self):
        return "<not a literal>"


_NOT_LITERAL = _NotLiteral()


def evidence_path(template: str, params: dict) -> str:
    """``template`` with ``{out_dir}`` filled from the parameters: a relative path inside the job folder."""
    out_dir = params.get("out_dir", "artifacts")
    if not isinstance(out_dir, str):
        raise Unavailable("out_dir of the parameters cell is not a literal string")
    path = os.path.normpath(template.format(out_dir=out_dir))
    if os.path.isabs(path) or path.split(os.sep)[0] == ".." or not path or path == ".":
        raise Unavailable("out_dir of the parameters cell leaves the job folder")
    return path


def read_evidence(root, paths, cap: int = MAX_EVIDENCE_BYTES) -> dict[str, bytes]:
    """The regular files ``paths`` (relative) under ``root``, each component opened without following a
    link (a planted symlink to a grader file reads as missing); a file over ``cap`` bytes is left out."""
    out = {}
    for rel in paths:
        parts = [p for p in rel.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            continue
        fd = None
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            for p in parts[:-1]:
                nxt = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nxt
            f = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
            with os.fdopen(f, "rb") as fh:
                st = os.fstat(fh.fileno())
                if st.st_mode & 0o170000 == 0o100000 and st.st_size <= cap:
                    out[rel] = fh.read(cap + 1)[:cap]
        except OSError:
            pass
        finally:
            if fd is not None:
                os.close(fd)
    return out


def history_rows(data: bytes, metrics: tuple) -> list[dict]:
    """Rows of a ``History.to_csv`` file: ``epoch`` (1, 2, ... consecutive) and float ``metrics``."""
    try:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8")))
        rows = [{"epoch": int(r["epoch"]), **{m: float(r[m]) for m in metrics}} for r in reader]
    except (UnicodeDecodeError, KeyError, TypeError, ValueError, csv.Error):
        raise Unavailable("a history file is not a History.to_csv table") from None
    if not rows or [r["epoch"] for r in rows] != list(range(1, len(rows) + 1)):
        raise Unavailable("a history file's epochs are not 1, 2, 3, ...")
    return rows


# --------------------------------------------------------------------------------------------------------
# The course's rules (notebook 04)
# --------------------------------------------------------------------------------------------------------

NOISY_CSV = "{out_dir}/noisy_labels_history.csv"
PATIENCE_CSV = "{out_dir}/patience_history.csv"


def n04_diagnosis(run: Run) -> dict:
    """``planted(seed)`` for the seed of the notebook's parameters cell (a literal int)."""
    from course_lib.scenarios.diagnosis import planted

    seed = run.params.get("seed", _NOT_LITERAL)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise Unavailable("the parameters cell's seed is not a literal int, so the planted runs are unknown")
    return {"diagnosis": dict(sorted(planted(seed).items()))}


def _noisy(run: Run) -> tuple[list, dict]:
    from course_lib.scenarios.memorize import NOISY, noisy_epochs

    rows = history_rows(run.file(NOISY_CSV), (NOISY["metric"],))
    if len(rows) != noisy_epochs(True):  # the grader runs fast mode: the whole run, no early stop
        raise Unavailable(f"noisy_labels_history.csv has {len(rows)} epochs, not {noisy_epochs(True)}")
    return rows, NOISY


def n04_best_epoch(run: Run) -> dict:
    """The epoch ``BestCheckpoint(NOISY metric, mode)`` keeps on the noisy-label run's history file."""
    from course_lib.scenarios.memorize import best_epoch_from_rows

    rows, noisy = _noisy(run)
    return {"best_epoch": best_epoch_from_rows(rows, noisy["metric"], noisy["mode"])}


def n04_stop_epoch(run: Run) -> dict:
    """The epoch the patience rule stops at on the patience run's history file; that run must have stopped
    there, and (same initial weights, same batches) repeat the noisy-label run's epochs up to it."""
    from course_lib.scenarios.memorize import stop_epoch_from_rows

    noisy_rows, noisy = _noisy(run)
    metric = noisy["metric"]
    rows = history_rows(run.file(PATIENCE_CSV), (metric,))
    stop = stop_epoch_from_rows(rows, metric, noisy["mode"], noisy["patience"])
    if stop is None or stop != rows[-1]["epoch"]:
        raise Unavailable("patience_history.csv does not end where its patience rule stops")
    if len(rows) > len(noisy_rows) or not all(math.isclose(a[metric], b[metric], rel_tol=1e-4, abs_tol=1e-6)
                                              for a, b in zip(rows, noisy_rows)):
        raise Unavailable("patience_history.csv is not the noisy-label run stopped early")
    return {"stop_epoch": stop}


RULES = {"n04_diagnosis": n04_diagnosis, "n04_best_epoch": n04_best_epoch, "n04_stop_epoch": n04_stop_epoch}


def expected_for(rule: str, run: Run) -> dict:
    """{answer name: expected value} from rule ``rule`` (a name in ``RULES`` or ``module:function``)."""
    if ":" in rule:
        import importlib

        mod, name = rule.split(":")
        fn = getattr(importlib.import_module(mod), name)
    else:
        fn = RULES[rule]
    return fn(run)
